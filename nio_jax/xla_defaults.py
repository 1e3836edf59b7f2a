"""XLA:CPU flags that nio_jax turns on at import, and how to turn them off.

`import nio_jax` appends `CPU_FLAGS` to the `XLA_FLAGS` environment variable, which XLA reads
once, when JAX creates its first backend. The flag routes reduce fusions on XLA:CPU through
YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=reduce`).

What was measured (`benchmarks/xla_flags.py`, `benchmarks/xla_precision.py`; figures in
docs/performance.md):
  * YNN's `dot` and `eltwise` fusions are NOT used: under them `relu(NaN)` becomes 0, so a
    batch of NaN images gives a finite loss and divergence would pass the non-finite checks
    (`tests/test_xla_defaults.py` reproduces it);
  * the `reduce` fusion keeps IEEE NaN propagation and float32 gradients as exact as XLA's
    own fusions, and it is faster: on an idle 2-core machine the gradient of ResNet-20's
    training loss (B=32) took 0.97x (no BN) and 0.76x (BN) of the time with XLA's own
    reductions, in one interleaved run (`benchmarks/results/xla_flags_cpu.md`).

Guarantees and limits:
  * a flag the user already set (by name, in `XLA_FLAGS`) is never overridden;
  * `NIO_JAX_XLA_DEFAULTS=0` in the environment turns every default off;
  * the flag only affects the CPU backend; GPU and TPU ignore it;
  * if JAX's backends were created before `import nio_jax` (an array was made first), the
    flags cannot take effect any more: `status()` says so, and nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)
OPT_OUT = "NIO_JAX_XLA_DEFAULTS"


def flag_name(flag: str) -> str:
  """The name of an XLA flag: `--name=value` -> `--name`."""
  return flag.split("=", 1)[0]


def backends_initialized() -> bool | None:
  """Whether JAX has created its backends (None where this JAX cannot tell)."""
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return None


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Appends the `CPU_FLAGS` the user did not set to `XLA_FLAGS`; returns those added."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  current = environ.get("XLA_FLAGS", "")
  set_by_user = {flag_name(f) for f in current.split()}
  added = [f for f in CPU_FLAGS if flag_name(f) not in set_by_user]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def status() -> dict:
  """The defaults present in `XLA_FLAGS`, and whether they took effect.

  `effective` is False when JAX's backends existed before `import nio_jax` (XLA had already
  read `XLA_FLAGS`), None when this JAX cannot tell.
  """
  flags = os.environ.get("XLA_FLAGS", "").split()
  return {
    "xla_flags": " ".join(flags),
    "defaults_present": [f for f in CPU_FLAGS if f in flags],
    "effective": None if BACKENDS_BEFORE_IMPORT is None else not BACKENDS_BEFORE_IMPORT,
  }


# Set at `import nio_jax`: whether JAX's backends already existed then.
BACKENDS_BEFORE_IMPORT: bool | None = None
