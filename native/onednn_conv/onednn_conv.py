"""oneDNN 2-D float32 convolutions for JAX on CPU through `jax.ffi` (issue 30 prototype).

Not wired into nio_jax. Build `libonednn_conv.so` first (`bash native/onednn_conv/build.sh`).

    from onednn_conv import conv, available
    y = conv(x, w, stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1)

`x` is NHWC, `w` HWIO (`[KH, KW, C/groups, O]`), float32; the result equals
`lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)`.

Autodiff: the three operations (forward `conv`, input gradient `conv_bwd_data`, weight
gradient `conv_bwd_weights`) are each a `jax.custom_vjp` whose backward pass calls the other
two. Each is bilinear in its two operands (B(x, w, dy) = <conv(x, w), dy>), so reverse-mode
derivatives of every order stay within the three oneDNN operations. Forward mode (`jvp`,
`jacfwd`) is not defined for a `custom_vjp` and raises.

Threads: the Debian build of oneDNN runs OpenMP (libgomp). Unless already set, this module
sets `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP workers sleep instead of spinning, so they do not
take the cores from XLA's own thread pool between two convolutions) before the library, and
with it libgomp, is loaded. `set_num_threads(n)` sets the threads of every later call
(default: `ONEDNN_CONV_THREADS`, else OpenMP's default: `OMP_NUM_THREADS` or the cores).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = pathlib.Path(__file__).resolve().parent
LIB_PATH = pathlib.Path(os.environ.get("ONEDNN_CONV_LIB", HERE / "libonednn_conv.so"))

TARGETS = {
  "onednn_conv_fwd": "OnednnConvFwd",
  "onednn_conv_bwd_data": "OnednnConvBwdData",
  "onednn_conv_bwd_weights": "OnednnConvBwdWeights",
}

_lib = None
_error: str | None = None


def _load():
  """Loads the library and registers the FFI targets once; returns the ctypes handle or None."""
  global _lib, _error
  if _lib is not None or _error is not None:
    return _lib
  if not LIB_PATH.exists():
    _error = f"{LIB_PATH} is not built (bash native/onednn_conv/build.sh)"
    return None
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when it loads
  try:
    lib = ctypes.cdll.LoadLibrary(str(LIB_PATH))
  except OSError as e:
    _error = f"cannot load {LIB_PATH}: {e}"
    return None
  lib.onednn_conv_info.restype = ctypes.c_char_p
  lib.onednn_conv_check_engine.restype = ctypes.c_int
  lib.onednn_conv_check_engine.argtypes = [ctypes.c_char_p, ctypes.c_int]
  lib.onednn_conv_set_num_threads.argtypes = [ctypes.c_int]
  buf = ctypes.create_string_buffer(512)
  if lib.onednn_conv_check_engine(buf, 512) != 0:
    _error = f"oneDNN has no usable CPU engine ({lib.onednn_conv_info().decode()}): " + (
      buf.value.decode(errors="replace")
    )
    return None
  for name, sym in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")
  nt = os.environ.get("ONEDNN_CONV_THREADS")
  if nt:
    lib.onednn_conv_set_num_threads(int(nt))
  _lib = lib
  return lib


def available() -> bool:
  """Whether the library is built, loads, has a CPU engine and its targets are registered."""
  return _load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  _load()
  return _error


def info() -> str:
  """oneDNN's version and CPU threading runtime, e.g. "oneDNN 2.6.3, cpu runtime omp"."""
  lib = _require()
  return lib.onednn_conv_info().decode()


def set_num_threads(n: int) -> None:
  """Threads of every later oneDNN call (OpenMP builds); n <= 0: the runtime's default."""
  _require().onednn_conv_set_num_threads(int(n))


def _require():
  lib = _load()
  if lib is None:
    raise RuntimeError(f"onednn_conv unavailable: {_error}")
  return lib


# ---------------------------------------------------------------------------------------------
# The configuration: a hashable tuple (stride, padding, dilation, groups), padding as
# ((lo_h, hi_h), (lo_w, hi_w)).


def _config(stride, padding, dilation, groups):
  stride = tuple(int(s) for s in stride)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  dilation = tuple(int(d) for d in dilation)
  if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
    raise ValueError("onednn_conv: 2-D convolutions only (stride, padding, dilation of length 2)")
  return stride, padding, dilation, int(groups)


def _attrs(cfg):
  stride, padding, dilation, groups = cfg
  return dict(
    window_strides=np.asarray(stride, np.int64),
    padding_lo=np.asarray([p[0] for p in padding], np.int64),
    padding_hi=np.asarray([p[1] for p in padding], np.int64),
    rhs_dilation=np.asarray(dilation, np.int64),
    feature_group_count=np.int64(groups),
  )


def out_shape(x_shape, w_shape, cfg):
  """NHWC output shape of the forward convolution (lax's formula)."""
  stride, padding, dilation, _ = cfg
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  sp = []
  for size, k, s, (lo, hi), d in zip((h, w), (kh, kw), stride, padding, dilation, strict=True):
    sp.append((size + lo + hi - (k - 1) * d - 1) // s + 1)
  return (n, sp[0], sp[1], o)


def _call(target, shape, a, b, cfg):
  _require()
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return jax.ffi.ffi_call(
    target, jax.ShapeDtypeStruct(tuple(shape), jnp.float32), vmap_method="sequential"
  )(a, b, **_attrs(cfg))


# ---------------------------------------------------------------------------------------------
# The three operations, each a custom_vjp whose backward uses the other two.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fwd(x, w, cfg):
  return _call("onednn_conv_fwd", out_shape(x.shape, w.shape, cfg), x, w, cfg)


def _fwd_fwd(x, w, cfg):
  return _fwd(x, w, cfg), (x, w)


def _fwd_bwd(cfg, res, dy):
  x, w = res
  return _bwd_data(dy, w, x.shape, cfg), _bwd_weights(x, dy, w.shape, cfg)


_fwd.defvjp(_fwd_fwd, _fwd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bwd_data(dy, w, x_shape, cfg):
  """dx = (d conv(x, w) / dx)^T dy, x of shape `x_shape`."""
  return _call("onednn_conv_bwd_data", x_shape, dy, w, cfg)


def _bwd_data_fwd(dy, w, x_shape, cfg):
  return _bwd_data(dy, w, x_shape, cfg), (dy, w)


def _bwd_data_bwd(x_shape, cfg, res, ct):
  # <ct, dx> = <conv(ct, w), dy>: linear in dy (-> conv(ct, w)) and in w (-> bwd_weights).
  dy, w = res
  return _fwd(ct, w, cfg), _bwd_weights(ct, dy, w.shape, cfg)


_bwd_data.defvjp(_bwd_data_fwd, _bwd_data_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bwd_weights(x, dy, w_shape, cfg):
  """dw = (d conv(x, w) / dw)^T dy, w of shape `w_shape`."""
  return _call("onednn_conv_bwd_weights", w_shape, x, dy, cfg)


def _bwd_weights_fwd(x, dy, w_shape, cfg):
  return _bwd_weights(x, dy, w_shape, cfg), (x, dy)


def _bwd_weights_bwd(w_shape, cfg, res, ct):
  # <ct, dw> = <conv(x, ct), dy>: -> bwd_data(dy, ct) for x, conv(x, ct) for dy.
  x, dy = res
  return _bwd_data(dy, ct, x.shape, cfg), _fwd(x, ct, cfg)


_bwd_weights.defvjp(_bwd_weights_fwd, _bwd_weights_bwd)


# ---------------------------------------------------------------------------------------------
# Public entry points.


def conv(x, w, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
  """`lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)` on oneDNN."""
  return _fwd(x, w, _config(stride, padding, dilation, groups))


def conv_bwd_data(
  dy, w, x_shape, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1
):
  """The input gradient of `conv` at cotangent `dy` (x of shape `x_shape`), on oneDNN."""
  return _bwd_data(
    dy, w, tuple(int(s) for s in x_shape), _config(stride, padding, dilation, groups)
  )


def conv_bwd_weights(
  x, dy, w_shape, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1
):
  """The weight gradient of `conv` at cotangent `dy` (w of shape `w_shape`), on oneDNN."""
  return _bwd_weights(
    x, dy, tuple(int(s) for s in w_shape), _config(stride, padding, dilation, groups)
  )


def reference_conv(x, w, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
  """The same convolution on XLA (`lax.conv_general_dilated`)."""
  return lax.conv_general_dilated(
    x,
    w,
    tuple(stride),
    tuple(tuple(p) for p in padding),
    rhs_dilation=tuple(dilation),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


__all__ = [
  "available",
  "conv",
  "conv_bwd_data",
  "conv_bwd_weights",
  "info",
  "out_shape",
  "reference_conv",
  "set_num_threads",
  "unavailable_reason",
]
