"""glibc malloc settings for XLA:CPU's per-execution buffers, and how to turn them on or off.

Why: on Linux, XLA:CPU (jaxlib's PJRT CPU client) allocates each execution's temporary
buffer with `posix_memalign` on one of its worker threads and frees it when the execution
ends. glibc serves a worker thread from a per-thread arena whose heaps are at most 64 MiB, so
a larger block (ResNet-110's training step: 261 MiB; a NIO step: about 0.5 GiB) gets a fresh
`mmap` on every step and is unmapped again at its end: every page of it faults in,
zero-filled, on every step (`benchmarks/levers.py` counts the minor faults per step). The
`MALLOC_MMAP_MAX_` environment variable does not reach that path; only a main-arena
allocation honours it.

`apply()` calls glibc's `mallopt` to put every thread that allocates after it on the main
arena (`M_ARENA_MAX` = 1), to serve large blocks from the heap instead of `mmap`
(`M_MMAP_MAX` = 0) and to keep freed heap memory instead of returning it to the system
(`M_TRIM_THRESHOLD` = 64 GiB), so the same pages serve the next step.

Guarantees and limits:
  * it changes no result: only where memory comes from;
  * it only acts on Linux with glibc (elsewhere `apply()` returns False and does nothing);
  * threads that already had their own arena keep it: it takes effect only when it runs
    before JAX creates its backends (`import nio_jax` runs it, when `ENV` asks for it; if an
    array was computed before `import nio_jax`, `status()["effective"]` is False);
  * freed memory stays with the process (its peak RSS is unchanged, its RSS after a large
    step stays near that peak until the process ends);
  * `ENV` (`NIO_JAX_CPU_MALLOC`) = 1 turns it on at import, 0 off; unset means `DEFAULT`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "NIO_JAX_CPU_MALLOC"
DEFAULT = False  # measured in benchmarks/levers.py before any change of this default
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest, 2 GiB
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))

APPLIED = False


def wanted(environ=None) -> bool:
  """Whether `ENV` (else `DEFAULT`) asks for the settings at import."""
  value = (os.environ if environ is None else environ).get(ENV)
  if value is None or not value.strip():
    return DEFAULT
  return value.strip().lower() not in ("0", "false", "no", "off")


def _libc():
  if not sys.platform.startswith("linux"):
    return None
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    return libc
  except (OSError, AttributeError):
    return None


def apply() -> bool:
  """Sets `SETTINGS` with glibc's `mallopt`; True where every call succeeded."""
  global APPLIED
  libc = _libc()
  if libc is None:
    return False
  ok = all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in SETTINGS)
  APPLIED = APPLIED or ok
  return ok


def status() -> dict:
  """`{"applied", "effective"}`: whether `apply()` ran and succeeded, and whether it can act
  (it ran before JAX's backends existed; None where JAX cannot tell)."""
  from nio_jax import xla_defaults

  before = xla_defaults.BACKENDS_BEFORE_IMPORT
  return {"applied": APPLIED, "effective": APPLIED and (None if before is None else not before)}
