"""XLA:CPU flags that nio_jax sets at import, and how to turn them off.

`import nio_jax` appends `CPU_FLAGS` to the `XLA_FLAGS` environment variable, which XLA reads
once, when JAX creates its first backend. The flag turns XLA:CPU's YNNPACK fusions off
(`--xla_cpu_experimental_ynn_fusion_type=`, an empty list), so that every fusion is XLA's own.

Why (`benchmarks/xla_flags.py`; figures in docs/performance.md): with YNN fusions a ReLU
fused into a YNN fusion maps NaN to 0. Under this jaxlib's own default, and under the
`reduce` fusion that nio_jax set before issue 30, NaN images give the zoo's ResNet-20 (with
and without BN) a finite loss of ln(10): divergence would pass the trainer's and the searches'
non-finite checks. Only with YNN off does NaN propagate (`tests/test_xla_defaults.py`
reproduces both on a small net with a global average pool). YNN off is also the closer to
float64 (the BN gradient's error is about half of `reduce`'s). What it costs: the ResNet-20
training gradient takes a few per cent (no BN) to about a tenth (BN) longer than with
`reduce`, in one interleaved run (`benchmarks/results/xla_flags_cpu.md`).

Guarantees and limits:
  * a flag the user already set (by name, in `XLA_FLAGS`) is never overridden: setting
    `--xla_cpu_experimental_ynn_fusion_type=reduce` yourself brings the faster, NaN-unsafe
    fusions back;
  * `NIO_JAX_XLA_DEFAULTS=0` in the environment turns every default off (XLA's own defaults,
    which include YNN fusions on this jaxlib, apply);
  * the flag only affects the CPU backend; GPU and TPU ignore it;
  * if JAX's backends were created before `import nio_jax` (an array was made first), the
    flags cannot take effect any more: `status()` says so, and nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
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
