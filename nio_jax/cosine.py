"""GradCosine: the mean off-diagonal cosine similarity of per-example (or sub-batch) gradients.

This module is *where GradCosine is computed*. Given `D` gradients `g_1..g_D` (flattened over
all selected parameter leaves) with norms `n_i = ‖g_i‖` and unit vectors `u_i = g_i / n_i`:

    GC = 1/(D(D−1)) Σ_{i≠j} cos(g_i, g_j) = (‖Σ_i u_i‖² − D) / (D(D−1)),

so neither the D×D cosine matrix nor a flattened copy of the gradients is ever built.
`D = B` in the sample-wise setting; `D = num_chunks` in the batch setting.

The statistics (`gradcosine_stats`, `compute_stats`) are differentiable with respect to
`params` (the NIO search differentiates through them: second-order autodiff through the
per-example gradients). `gradcosine` checks its inputs and runs the compiled statistics
(`stats_step`); `measure` averages them over batches (the before/after reports).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nio_jax import batches as batchmod
from nio_jax import (
  checks,
  distributed,
  errors,
  formulation,
  leaves,
  per_example,
  per_example_norms,
  stochastic,
)
from nio_jax.formulation import Formulation
from nio_jax.step_cache import StepCache

PyTree = Any


class GCStats(NamedTuple):
  """GradCosine and the gradient norms it was computed from.

  Attributes:
    gc: scalar, mean off-diagonal cosine of the D gradients.
    grad_norms: `[D]`, the norm of each per-example / sub-batch gradient.
    loss: scalar, mean per-example loss of the batch (for monitoring).
  """

  gc: jax.Array
  grad_norms: jax.Array
  loss: jax.Array

  @property
  def grad_norm(self) -> jax.Array:
    """Mean gradient norm, the quantity NIO's constraint bounds by γ."""
    return jnp.mean(self.grad_norms)


def safe_sqrt(x):
  """`sqrt(x)` with 0 (and a zero gradient) where `x <= 0`: no NaN in the backward pass."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def unit_sum(grads) -> tuple[list[jax.Array], jax.Array]:
  """The first step of GradCosine: `(Σ_i u_i per leaf, norms)` of a stack of gradients.

  Every leaf of `grads` has the leading axis D (one row per gradient; any D, no check);
  `u_i = g_i / ‖g_i‖` over all leaves, and a zero gradient gives a zero unit vector (no NaN).
  Sums of unit vectors over disjoint sets of rows add up, so the sharded statistics
  (`samplewise_stats`) `psum` them before `gc_from_unit_sum`.
  """
  grad_leaves = jax.tree_util.tree_leaves(grads)
  d = grad_leaves[0].shape[0]
  rows = [
    jnp.reshape(g.astype(jnp.promote_types(g.dtype, jnp.float32)), (d, -1)) for g in grad_leaves
  ]
  norms = safe_sqrt(sum(jnp.sum(g**2, axis=1) for g in rows))
  inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  return [jnp.tensordot(inv, g, axes=1) for g in rows], norms


def sample_unit_sum(loss_fn, params, batch, form: Formulation, wrt=None):
  """`(losses, Σ_i u_i per leaf, norms)` of the B per-example gradients (sample-wise).

  With `form.pullback == "norms"` from per-layer norms, never building a per-example
  gradient (`nio_jax.per_example_norms.unit_sum`); where "auto" chose it and the loss is
  refused there, `form.fallback` runs instead. Otherwise `unit_sum` of
  `per_example.sample_grads_selected`'s gradients. Traceable and differentiable.
  """
  if form.pullback == "norms":
    sel, rebuild, _ = per_example.select_leaves(params, wrt)
    try:
      return per_example_norms.unit_sum(
        formulation.with_conv(loss_fn, form.conv), sel, rebuild, batch
      )
    except per_example_norms.NormsUnsupported:
      if form.fallback is None:
        raise
      form = form.fallback
  losses, grads = per_example.sample_grads_selected(loss_fn, params, batch, form, wrt)
  usum, norms = unit_sum(grads)
  return losses, usum, norms


def gc_from_unit_sum(usum: list[jax.Array], d) -> jax.Array:
  """The finishing step of GradCosine: `(‖Σ_i u_i‖² − D) / (D(D−1))` from `unit_sum`'s sums."""
  return (sum(jnp.sum(u**2) for u in usum) - d) / (d * (d - 1))


def gc_from_grads(grads: list | PyTree) -> tuple[jax.Array, jax.Array]:
  """(GC, norms) of a stack of gradients: every leaf has the leading axis D ≥ 2.

  Uses the identity GC = (‖Σ u_i‖² − D)/(D(D−1)) (`unit_sum`, then `gc_from_unit_sum`). A
  zero gradient gives a zero unit vector (no NaN); callers report it through
  `grad_norms == 0`. Checks shapes only, so it composes with `jit`, `vmap` and `grad`.
  """
  d = checks.check_grad_stack(grads)
  usum, norms = unit_sum(grads)
  return gc_from_unit_sum(usum, d), norms


def gc_brute_force(grads) -> jax.Array:
  """Reference form: the mean off-diagonal entry of the explicit D×D cosine matrix."""
  grad_leaves = jax.tree_util.tree_leaves(grads)
  d = grad_leaves[0].shape[0]
  flat = jnp.concatenate([jnp.reshape(g, (d, -1)) for g in grad_leaves], axis=1)
  norms = jnp.linalg.norm(flat, axis=1)
  cos = (flat @ flat.T) / (norms[:, None] * norms[None, :])
  return (jnp.sum(cos) - jnp.trace(cos)) / (d * d - d)


def compute_stats(
  loss_fn, params, batch, form: Formulation, *, num_chunks=None, overlap=0.0, wrt=None
) -> GCStats:
  """`GCStats` with a resolved formulation (`nio_jax.formulation.resolve_formulation`).

  Traceable and differentiable; no host-side checks. `form` is the setting's: sample-wise
  when `num_chunks` is None, else the batch setting of D = `num_chunks` sub-batches with
  overlap ratio `overlap`.
  """
  if num_chunks is None:
    losses, usum, norms = sample_unit_sum(loss_fn, params, batch, form, wrt)
    gc = gc_from_unit_sum(usum, checks.batch_size(batch))
  else:
    losses, grads = per_example.subbatch_grads_selected(
      loss_fn, params, batch, num_chunks, overlap, form, wrt
    )
    gc, norms = gc_from_grads(grads)
  loss = jnp.mean(jax.lax.stop_gradient(losses))
  return GCStats(gc=gc, grad_norms=norms, loss=loss)


def gradcosine_stats(
  loss_fn,
  params,
  batch,
  *,
  num_chunks=None,
  overlap=0.0,
  wrt=None,
  pullback="auto",
  conv="auto",
  chunk_size=None,
) -> GCStats:
  """Traceable core of `gradcosine` with no host-side checks (use inside jit/grad).

  Resolves the formulation for this loss (`formulation.resolve_formulation`), then
  `compute_stats`. The arguments are `gradcosine`'s.
  """
  form = formulation.resolve_formulation(
    loss_fn, params, batch, num_chunks, pullback, conv, chunk_size
  )
  return compute_stats(
    loss_fn, params, batch, form, num_chunks=num_chunks, overlap=overlap, wrt=wrt
  )


def _stats_step(loss_fn, num_chunks, overlap, wrt, pullback, conv, chunk_size, params, batch):
  # "auto" is resolved here, once per trace: a compiled statistics step has it resolved.
  form = formulation.resolve_formulation(
    loss_fn, params, batch, num_chunks, pullback, conv, chunk_size
  )
  stats = functools.partial(
    compute_stats, loss_fn, form=form, num_chunks=num_chunks, overlap=overlap, wrt=wrt
  )
  return formulation.with_canonical_convs(stats, form)(params, batch)


_STATS_STEPS = StepCache("gradcosine_stats", maxsize=32)


def stats_step(loss_fn: Callable, num_chunks, overlap, wrt, pullback, conv, chunk_size):
  """The jitted `(params, batch) -> GCStats` of one setting (`gradcosine`, `measure`).

  The arguments are `gradcosine`'s, in its order. Compiled once per `loss_fn` object and
  setting: the step is cached on all of them (`nio_jax.step_cache.StepCache`), and "auto" is
  resolved for the loss when it is traced.
  """
  key = (loss_fn, num_chunks, overlap, wrt, pullback, conv, chunk_size)
  return _STATS_STEPS.get(key, lambda: jax.jit(functools.partial(_stats_step, *key)))


def gradcosine(
  loss_fn: Callable,
  params: PyTree,
  batch: PyTree,
  *,
  num_chunks: int | None = None,
  overlap: float = 0.0,
  wrt: Callable | None = None,
  pullback: str = "auto",
  conv: str = "auto",
  chunk_size: int | None = None,
  check: bool = True,
) -> GCStats:
  """GradCosine of `loss_fn` at `params` on `batch`, and the gradient norms it uses.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: pytree of float arrays.
    batch: pytree with a leading batch axis `B ≥ 2`.
    num_chunks: `None` for the sample-wise GC over the B per-example gradients; an int `D`
      (2 ≤ D ≤ B) for the batch setting over D overlapping sub-batches.
    overlap: overlap ratio `r ∈ [0, 1)` of the sub-batches (batch setting only).
    wrt: optional predicate `(path, leaf) -> bool` selecting the leaves whose gradients
      enter the cosine (the released NIO code uses conv/dense/layer-norm weights and biases,
      `nio_jax.leaves.LeafKinds.grad_filter`, what the searches pass). `None` selects every
      leaf.
    pullback: how the D gradients are pulled back, see `formulation.SAMPLE_PULLBACKS` /
      `SUBBATCH_PULLBACKS`; "auto" = the backend's measured default
      (`formulation.resolve_formulation`).
    conv: how convolutions are evaluated, one of `formulation.CONVS` or "auto".
    chunk_size: sample-wise only: process this many examples (or rows) at a time.
    check: check the inputs (on concrete values only) and, when the result is concrete,
      raise `ZeroGradientError` if a gradient is zero (its cosine is undefined). Inside
      `jit` / `vmap` / `grad` the value checks skip themselves, so the defaults compose.

  Returns:
    `GCStats(gc, grad_norms, loss)`. Differentiable w.r.t. `params`, and usable under
    transformations with the default arguments, e.g.
    `jax.jit(lambda s: gradcosine(loss_fn, apply_scales(params, s), batch).gc)(scales)`.

  Raises:
    ValueError: bad input, an unknown or invalid pullback / conv (the message names the
      option and its valid values), or pullback="segments" with cross-example coupling.
  """
  b = checks.check_batch(batch) if check else checks.batch_size(batch)
  checks.check_chunks(b, num_chunks, overlap)
  if check:
    checks.check_params(params)
    checks.check_loss_fn(loss_fn, params, batch)
  stats_fn = stats_step(loss_fn, num_chunks, overlap, wrt, pullback, conv, chunk_size)
  stats = stats_fn(params, batch)
  if check and not isinstance(stats.gc, jax.core.Tracer):
    check_stats(stats, num_chunks)
  return stats


def check_stats(stats: GCStats, num_chunks=None, step: int | None = None, last_good=None):
  """Raises if the stats are unusable: zero gradients or non-finite values.

  Raises:
    NonFiniteError: a non-finite loss, GradCosine or gradient norm (with `step` and
      `last_good` attached).
    ZeroGradientError: a gradient is exactly zero (its cosine is undefined).
  """
  where = "" if step is None else f" at step {step}"
  norms = distributed.to_host(stats.grad_norms)  # gathers norms sharded over processes
  for name, value in (("loss", stats.loss), ("GradCosine", stats.gc), ("gradient norm", norms)):
    if not bool(jnp.all(jnp.isfinite(value))):
      raise errors.NonFiniteError(
        f"non-finite {name}{where}: {value}. Lower the learning rate / check the inputs; "
        "the returned result keeps the last finite params.",
        step=step or 0,
        last_good=last_good,
      )
  zero = [int(i) for i in jnp.nonzero(norms == 0)[0]]
  if zero:
    what = "example" if num_chunks is None else "sub-batch"
    raise errors.ZeroGradientError(
      f"{what}(s) {zero} have an all-zero gradient{where}, so their cosine is undefined. "
      "Typical causes: a dead network (all ReLUs off), a zero-initialised output layer "
      "(Fixup: run GradCosine after a first step), or a loss that ignores those examples.",
      zero,
    )


def measure(
  loss_fn: Callable,
  params: PyTree,
  batches: Iterable,
  *,
  num_batches: int = 10,
  num_chunks: int | None = 4,
  overlap: float = 0.2,
  wrt: Any = "default",
  pullback: str = "auto",
  conv: str = "auto",
  chunk_size: int | None = None,
  show_progress: bool = False,
) -> dict[str, float]:
  """GradCosine and gradient norm averaged over `num_batches` batches (before/after report).

  `wrt="default"` takes the conv, dense and layer-norm leaves (structure, see
  `nio_jax.leaves`), as the search does; None takes every leaf; or pass a predicate.
  `pullback` / `conv` are as in `gradcosine`; one compiled statistics step (`stats_step`)
  serves every batch.

  Returns a dict with `gc`, `gc_std`, `grad_norm`, `grad_norm_std`, `loss`, `num_batches`.
  """
  if (
    isinstance(num_batches, bool)
    or not isinstance(num_batches, (int, np.integer))
    or num_batches < 1
  ):
    raise ValueError(f"num_batches={num_batches!r} must be an int >= 1.")
  checks.check_params(params)
  checks.check_optional_int("chunk_size", chunk_size)
  checks.check_predicate("wrt", wrt, allow=("default",))
  first, batches = batchmod.peek(stochastic.keyed_batches(loss_fn, batches))
  b = checks.check_batch(first)
  checks.check_chunks(b, num_chunks, overlap)
  checks.check_loss_fn(loss_fn, params, first)
  wrt_fn = leaves.resolve_grad_filter(wrt, loss_fn, params)
  stats_fn = stats_step(loss_fn, num_chunks, overlap, wrt_fn, pullback, conv, chunk_size)
  rows = []
  for (batch,) in batchmod.progress_bar(
    batchmod.iterate_batches(batches, num_batches), num_batches, "measure", show_progress
  ):
    checks.check_batch(batch)
    st = stats_fn(params, batch)
    check_stats(st, num_chunks, step=len(rows))
    rows.append((float(st.gc), float(st.grad_norm), float(st.loss)))
  arr = np.asarray(rows)
  return {
    "gc": float(arr[:, 0].mean()),
    "gc_std": float(arr[:, 0].std()),
    "grad_norm": float(arr[:, 1].mean()),
    "grad_norm_std": float(arr[:, 1].std()),
    "loss": float(arr[:, 2].mean()),
    "num_batches": int(num_batches),
  }


def samplewise_stats(loss_fn, params, batch, mesh, form: Formulation, *, wrt=None):
  """Sample-wise `GCStats` computed data-parallel with `shard_map` (traceable, differentiable).

  Each device computes the per-example gradients of its own examples, their norms and its
  local `Σ_i u_i` (`unit_sum`); one `psum` gives the global `Σ_i u_i`, which
  `gc_from_unit_sum` finishes exactly as on one device.

  Why not leave it to GSPMD: on jax 0.10.2 / XLA:CPU, letting the partitioner shard
  `vmap(grad)` of a convolution over the batch gave wrong per-example kernel gradients
  (errors of the size of the gradients themselves; reproduced in
  tests/test_distributed.py::test_gspmd_vmap_conv_grads_are_checked). `shard_map` keeps every
  per-example computation on one device.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: replicated parameters.
    batch: the global batch, sharded over the mesh's `data` axis.
    mesh: the mesh (`distributed.make_mesh`).
    form: the resolved sample-wise formulation
      (`nio_jax.formulation.resolve_formulation(loss_fn, params, batch, None, ...)`).
    wrt: predicate `(path, leaf) -> bool` selecting the leaves whose gradients enter GC.
  """
  b, axis = checks.batch_size(batch), distributed.AXIS

  def local(p, bt):
    losses, usum, norms = sample_unit_sum(loss_fn, p, bt, form, wrt)
    usum = [jax.lax.psum(u, axis) for u in usum]
    loss_sum = jax.lax.psum(jnp.sum(jax.lax.stop_gradient(losses)), axis)
    return usum, norms, loss_sum

  usum, norms, loss_sum = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P(axis), P()), check_vma=False
  )(params, batch)
  gc = gc_from_unit_sum(usum, b)
  return GCStats(gc=gc, grad_norms=norms, loss=loss_sum / b)
