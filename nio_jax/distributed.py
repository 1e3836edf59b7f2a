"""Scale-out on JAX's own machinery: a data-parallel mesh over all devices.

The per-example-gradient work of the searches is data parallel: every example's (or
sub-batch's) gradient needs the whole parameter tree but only its own inputs. So the batch is
sharded along its leading axis over a 1-D `Mesh` named `"data"`, params and scales are
replicated, and `jit` (GSPMD) partitions the step; the only communication is the reductions
GradCosine needs (‖Σ u_i‖², the norms). Results equal the single-device ones to float tolerance
(tested with 8 simulated CPU devices).

Multi-host (TPU pods, multi-node GPU): call `initialize_multihost()` first on every host (it
wraps `jax.distributed.initialize`), build the mesh over `jax.devices()` (all hosts), and feed
each host's slice of the global batch with `shard_batch(..., global_batch=False)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nio_jax import checks, cosine
from nio_jax.formulation import Formulation

PyTree = Any
AXIS = "data"


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
  """1-D data-parallel mesh over the first `num_devices` devices (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def check_mesh(mesh, batch_size: int | None = None) -> None:
  """`mesh` is a `Mesh` with a `data` axis and (if given) `batch_size` divides over it."""
  if not isinstance(mesh, Mesh):
    raise TypeError(
      f"mesh must be a jax.sharding.Mesh (nio_jax.distributed.make_mesh()), got "
      f"{type(mesh).__name__}."
    )
  if AXIS not in mesh.axis_names:
    raise ValueError(
      f"mesh axes {mesh.axis_names} have no {AXIS!r} axis; build it with "
      "nio_jax.distributed.make_mesh()."
    )
  n = mesh.devices.size
  if batch_size is not None and batch_size % n:
    raise ValueError(
      f"batch size {batch_size} is not divisible by the {n} devices of the "
      f"mesh; use a multiple of {n}."
    )


def shard_batch(batch: PyTree, mesh: Mesh, *, global_batch: bool = True) -> PyTree:
  """Places `batch` with its leading axis split over the mesh's `data` axis.

  The batch size must be divisible by the number of devices. With `global_batch=False` each
  process passes its local slice (multi-host).
  """
  n = mesh.devices.size
  sharding = NamedSharding(mesh, P(AXIS))

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      raise ValueError("batch leaves need a leading batch axis to be sharded.")
    b = x.shape[0] * (1 if global_batch else jax.process_count())
    if b % n:
      raise ValueError(
        f"batch size {b} is not divisible by the {n} devices of the mesh; use a multiple of {n}."
      )
    if global_batch:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` on all devices of the mesh."""
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def sharded_batches(batches, mesh: Mesh):
  """Lazily shards each batch of an iterable (keeps lists re-iterable)."""
  if isinstance(batches, (list, tuple)):
    return [shard_batch(b, mesh) for b in batches]
  return (shard_batch(b, mesh) for b in batches)


def initialize_multihost(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)` (coordinator address etc. from the environment on
  TPU pods / SLURM); a no-op when already initialised or single-process."""
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:  # already initialised
    if "already" not in str(e).lower():
      raise


def samplewise_stats(loss_fn, params, batch, mesh: Mesh, form: Formulation, *, wrt=None):
  """Sample-wise `GCStats` computed data-parallel with `shard_map` (traceable, differentiable).

  Each device computes the per-example gradients of its own examples, their norms and its
  local `Σ_i u_i` (`cosine.unit_sum`); one `psum` gives the global `Σ_i u_i`, which
  `cosine.gc_from_unit_sum` finishes exactly as on one device.

  Why not leave it to GSPMD: on jax 0.10.2 / XLA:CPU, letting the partitioner shard
  `vmap(grad)` of a convolution over the batch gave wrong per-example kernel gradients
  (errors of the size of the gradients themselves; reproduced in
  tests/test_distributed.py::test_gspmd_vmap_conv_grads_are_checked). `shard_map` keeps every
  per-example computation on one device.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: replicated parameters.
    batch: the global batch, sharded over the mesh's `data` axis.
    mesh: the mesh (`make_mesh`).
    form: the resolved sample-wise formulation
      (`nio_jax.formulation.resolve_formulation(loss_fn, params, batch, None, ...)`).
    wrt: predicate `(path, leaf) -> bool` selecting the leaves whose gradients enter GC.
  """
  b = checks.batch_size(batch)

  def local(p, bt):
    losses, usum, norms = cosine.sample_unit_sum(loss_fn, p, bt, form, wrt)
    usum = [jax.lax.psum(u, AXIS) for u in usum]
    loss_sum = jax.lax.psum(jnp.sum(jax.lax.stop_gradient(losses)), AXIS)
    return usum, norms, loss_sum

  usum, norms, loss_sum = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P(AXIS), P()), check_vma=False
  )(params, batch)
  gc = cosine.gc_from_unit_sum(usum, b)
  return cosine.GCStats(gc=gc, grad_norms=norms, loss=loss_sum / b)
