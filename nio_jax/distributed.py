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

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
      return _put_global(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map(put, batch)


def _put_global(x, sharding: NamedSharding):
  """`jax.device_put(x, sharding)`; in a multi-process run a host value (the same on every
  process) is cut into this process's shards with `make_array_from_callback` (a local
  jax.Array put on other processes' devices gives an array whose shards cannot be read
  back, e.g. by Orbax)."""
  if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _put_global(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  a = np.asarray(x)
  return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` on all devices of the mesh (of every process: a host value
  must then be the same on every process)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: _put_global(x, sharding), tree)


def sharded_batches(batches, mesh: Mesh):
  """Lazily shards each batch of an iterable (keeps lists re-iterable)."""
  if isinstance(batches, (list, tuple)):
    return [shard_batch(b, mesh) for b in batches]
  return (shard_batch(b, mesh) for b in batches)


# Environment variables read by `initialize_from_env` (the CLI's multi-process switch).
ENV_COORDINATOR = "NIO_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "NIO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "NIO_JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "NIO_JAX_INIT_TIMEOUT"
# Seconds `initialize_multihost` waits for the coordinator and every process to register.
DEFAULT_INIT_TIMEOUT = 120


class DistributedInitError(RuntimeError):
  """The multi-process runtime could not start (coordinator unreachable, bad arguments)."""


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise DistributedInitError(
      f"coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.1:8476 or localhost:8476)."
    )
  return host.strip("[]") or "localhost", int(port)


def wait_for_coordinator(address: str, timeout: float, *, process_id: int | None = None) -> None:
  """Retries a TCP connection to `address` (HOST:PORT) until it answers or `timeout` seconds
  pass; raises `DistributedInitError` naming the address and the fix.

  Why: JAX's client aborts the whole interpreter (a fatal C++ check, no Python exception) when
  the coordinator does not answer within `initialization_timeout`, so a process other than
  the coordinator checks that the address is reachable before it calls
  `jax.distributed.initialize`.
  """
  import socket  # noqa: PLC0415
  import time  # noqa: PLC0415

  host, port = _split_address(address)
  deadline = time.monotonic() + timeout
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(timeout, 0.1))):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      break
    time.sleep(0.2)
  who = "" if process_id is None else f"process {process_id}: "
  raise DistributedInitError(
    f"{who}the coordinator at {address} did not answer within {timeout:g} s ({last}). "
    f"Start process 0 (it runs the coordinator on that port) and check that HOST:PORT is "
    f"reachable from this host (firewall, the host name process 0's machine has); set "
    f"{ENV_COORDINATOR}/coordinator_address to process 0's address, or raise the wait "
    f"with initialization_timeout / {ENV_INIT_TIMEOUT}."
  )


def is_initialized() -> bool:
  """Whether `jax.distributed.initialize` has run in this process."""
  try:
    from jax._src import distributed as _dist  # noqa: PLC0415

    return _dist.global_state.client is not None
  except (ImportError, AttributeError):
    return False


def initialize_multihost(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  initialization_timeout: int | None = None,
  **kwargs,
) -> None:
  """`jax.distributed.initialize` with a bounded, explained start; a no-op when already
  initialised.

  Call it first on every process, before any JAX computation. On TPU pods and SLURM the
  arguments can be left out (JAX detects the cluster). With an explicit `coordinator_address`
  every process other than 0 first waits up to `initialization_timeout` seconds (default
  `DEFAULT_INIT_TIMEOUT`, or `NIO_JAX_INIT_TIMEOUT`) for the coordinator to accept connections
  and raises `DistributedInitError` naming the address and the fix, instead of JAX's fatal
  abort. Other keyword arguments (`heartbeat_timeout_seconds`, `local_device_ids`, ...) go to
  `jax.distributed.initialize`. On CPU, cross-process collectives use gloo.
  """
  if is_initialized():
    return
  if initialization_timeout is None:
    initialization_timeout = int(os.environ.get(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT))
  try:  # CPU collectives across processes (the default on recent JAX; needed on older ones)
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass
  if coordinator_address is not None and process_id not in (None, 0):
    wait_for_coordinator(coordinator_address, initialization_timeout, process_id=process_id)
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=initialization_timeout,
      **kwargs,
    )
  except RuntimeError as e:
    if "already" in str(e).lower():
      return
    raise DistributedInitError(
      f"jax.distributed.initialize(coordinator_address={coordinator_address!r}, "
      f"num_processes={num_processes}, process_id={process_id}) failed: {e}. Call "
      "initialize_multihost() before any JAX computation (before the first array is made), "
      "once per process, with the same coordinator and count everywhere."
    ) from e


def initialize_from_env(environ=None) -> bool:
  """Starts the multi-process runtime from `NIO_JAX_COORDINATOR` (HOST:PORT),
  `NIO_JAX_NUM_PROCESSES` and `NIO_JAX_PROCESS_ID` when they are set; returns whether it did.

  The CLI calls it first, before any JAX backend starts. Without `NIO_JAX_COORDINATOR`
  nothing happens (single process), unless `NIO_JAX_NUM_PROCESSES` is set alone (> 1): then
  JAX detects the cluster itself (TPU pod, SLURM).
  """
  env = os.environ if environ is None else environ
  address = env.get(ENV_COORDINATOR) or None
  count = env.get(ENV_NUM_PROCESSES)
  index = env.get(ENV_PROCESS_ID)
  if address is None and (count is None or int(count) <= 1):
    return False
  if address is not None and (count is None or index is None):
    raise DistributedInitError(
      f"{ENV_COORDINATOR}={address} is set but {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID} are "
      "not: set all three (the same coordinator and count on every process, index 0..N-1)."
    )
  initialize_multihost(
    coordinator_address=address,
    num_processes=None if count is None else int(count),
    process_id=None if index is None else int(index),
  )
  return True


def cli_setup(environ=None) -> None:
  """The multi-process switch of the `nio-jax` entry point, called first (before any JAX
  backend starts): `initialize_from_env`, and in a multi-process run every line this
  process prints to stdout/stderr starts with `[process i/N]`. A failed start exits with
  `nio-jax: error: ...` (status 2)."""
  import sys  # noqa: PLC0415

  try:
    started = initialize_from_env(environ)
  except DistributedInitError as e:
    print(f"nio-jax: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if started and jax.process_count() > 1:
    tag = process_tag()
    sys.stdout = _Tagged(sys.stdout, tag)
    sys.stderr = _Tagged(sys.stderr, tag)


class _Tagged:
  """A text stream whose every line starts with `tag` (the process of a multi-process run)."""

  def __init__(self, stream, tag: str):
    self._stream, self._tag, self._at_start = stream, tag, True

  def write(self, text: str) -> int:
    out = []
    for piece in text.splitlines(keepends=True):
      if self._at_start and not piece.startswith(self._tag):
        out.append(self._tag)
      out.append(piece)
      self._at_start = piece.endswith(("\n", "\r"))
    self._stream.write("".join(out))
    return len(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def process_tag() -> str:
  """`"[process i/N] "` in a multi-process run, `""` otherwise (for log lines)."""
  n = jax.process_count()
  return f"[process {jax.process_index()}/{n}] " if n > 1 else ""


def to_host(tree: PyTree) -> PyTree:
  """`jax.device_get(tree)`, also for arrays spanning other processes' devices.

  A leaf that is fully addressable or fully replicated (metrics reduced over the batch,
  replicated params) is read locally; a leaf sharded over other processes' devices (per-example
  gradient norms of a global batch) is gathered with `process_allgather`, a collective: every
  process must call `to_host` on the same arrays in the same order.
  """

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils  # noqa: PLC0415

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)

  return jax.tree_util.tree_map(get, tree)
