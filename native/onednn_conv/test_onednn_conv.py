"""The oneDNN convolutions against `lax.conv_general_dilated` (float32).

    bash native/onednn_conv/build.sh && python -m pytest native/onednn_conv -q

Skipped, with the reason, when `libonednn_conv.so` is not built or oneDNN has no CPU engine.
Errors are norm-relative, `|a - b| / |b|`, against XLA's float32 result; the bound is 1e-6
for each operation and each derivative (issue 30's exactness rule).

Configurations: every convolution of the zoo's ResNet-20 (`models/cifar_resnet.py`: 3x3,
padding 1, stride 1 at 32/16/8 px with 16/32/64 channels, the 3->16 stem, and the two stride-2
transitions 16->32 and 32->64; its down-sampling shortcuts are a strided slice plus zero
channels, no convolution), at the real spatial sizes and batch 2, plus a few beyond it
(1x1 stride 2, asymmetric padding, dilation 2, feature groups 2) for the attributes.
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import onednn_conv as oc  # noqa: E402

pytestmark = pytest.mark.skipif(
  not oc.available(), reason=f"oneDNN convolution library unavailable: {oc.unavailable_reason()}"
)

TOL = 1e-6

# (name, x shape NHWC, w shape HWIO, stride, padding, dilation, groups)
RESNET20 = [
  ("stem_3to16_32px", (2, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
  ("16_32px", (2, 32, 32, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
  ("16to32_s2", (2, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
  ("32_16px", (2, 16, 16, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
  ("32to64_s2", (2, 16, 16, 32), (3, 3, 32, 64), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
  ("64_8px", (2, 8, 8, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
]
EXTRA = [
  ("1x1_s2", (2, 16, 16, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),
  ("asym_pad_s2", (2, 9, 10, 8), (3, 3, 8, 8), (2, 2), ((0, 1), (1, 0)), (1, 1), 1),
  ("dilation2", (2, 12, 12, 8), (3, 3, 8, 8), (1, 1), ((2, 2), (2, 2)), (2, 2), 1),
  ("groups2", (2, 10, 10, 8), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),
]
CONFIGS = RESNET20 + EXTRA
IDS = [c[0] for c in CONFIGS]


def rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make(cfg, seed=0):
  _, xs, ws, stride, padding, dilation, groups = cfg
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(ws) / np.sqrt(np.prod(ws[:3])), jnp.float32)
  kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
  ys = oc.out_shape(xs, ws, oc._config(stride, padding, dilation, groups))
  ct = jnp.asarray(rng.standard_normal(ys), jnp.float32)
  return x, w, ct, kw


def test_info():
  assert oc.info().startswith("oneDNN ")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_forward(cfg):
  x, w, _, kw = make(cfg)
  y = jax.jit(lambda x, w: oc.conv(x, w, **kw))(x, w)
  ref = oc.reference_conv(x, w, **kw)
  assert y.shape == ref.shape
  assert rel(y, ref) <= TOL


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_backward_data(cfg):
  x, w, ct, kw = make(cfg)
  dx = jax.jit(lambda ct, w: oc.conv_bwd_data(ct, w, x.shape, **kw))(ct, w)
  (ref,) = jax.vjp(lambda x: oc.reference_conv(x, w, **kw), x)[1](ct)
  assert dx.shape == ref.shape
  assert rel(dx, ref) <= TOL


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_backward_weights(cfg):
  x, w, ct, kw = make(cfg)
  dw = jax.jit(lambda x, ct: oc.conv_bwd_weights(x, ct, w.shape, **kw))(x, ct)
  (ref,) = jax.vjp(lambda w: oc.reference_conv(x, w, **kw), w)[1](ct)
  assert dw.shape == ref.shape
  assert rel(dw, ref) <= TOL


def loss(f, kw, ct):
  """A loss that is not linear in the convolution, so its gradient holds the forward result
  and the reverse-over-reverse derivative goes through all three operations."""

  def L(x, w):
    y = f(x, w, **kw)
    return jnp.sum(ct * y) + 0.5 * jnp.mean(y * y)

  return L


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_first_derivatives(cfg):
  x, w, ct, kw = make(cfg)
  g = jax.jit(jax.grad(loss(oc.conv, kw, ct), (0, 1)))(x, w)
  ref = jax.grad(loss(oc.reference_conv, kw, ct), (0, 1))(x, w)
  assert rel(g[0], ref[0]) <= TOL
  assert rel(g[1], ref[1]) <= TOL


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_second_order_reverse_over_reverse(cfg):
  x, w, ct, kw = make(cfg)
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  v = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)

  def of_grads(f):
    def H(x, w):
      gx, gw = jax.grad(loss(f, kw, ct), (0, 1))(x, w)
      return jnp.sum(gx * u) + jnp.sum(gw * v) + 0.5 * jnp.sum(gw * gw)

    return H

  h = jax.jit(jax.grad(of_grads(oc.conv), (0, 1)))(x, w)
  ref = jax.grad(of_grads(oc.reference_conv), (0, 1))(x, w)
  assert rel(h[0], ref[0]) <= TOL
  assert rel(h[1], ref[1]) <= TOL


def test_third_order_stays_in_the_three_ops():
  """grad of grad of grad: each level's VJP is again one of the three oneDNN calls."""
  cfg = RESNET20[2]
  x, w, ct, kw = make(cfg)

  def third(f):
    def L(w):
      return jnp.sum(jnp.tanh(f(x, w, **kw)) * ct)

    def g2(w):
      g = jax.grad(L)(w)
      return jnp.sum(jax.grad(lambda w: jnp.sum(jax.grad(L)(w) ** 2))(w) * g)

    return jax.grad(g2)(w)

  got = jax.jit(lambda w: third(oc.conv))(w)
  ref = third(oc.reference_conv)
  # tanh's higher derivatives amplify the forward's rounding: compare at 1e-5
  assert rel(got, ref) <= 1e-5
  txt = jax.jit(lambda w: third(oc.conv)).lower(w).as_text()
  assert "convolution" not in txt  # no XLA convolution left: all on oneDNN


def test_vmap_sequential():
  cfg = RESNET20[3]
  x, w, _, kw = make(cfg)
  ws = jnp.stack([w, 2 * w, -w])
  got = jax.vmap(lambda w: oc.conv(x, w, **kw))(ws)
  ref = jax.vmap(lambda w: oc.reference_conv(x, w, **kw))(ws)
  assert rel(got, ref) <= TOL


def test_forward_mode_not_supported():
  """custom_vjp has no JVP: forward-over-reverse (MetaInit's HVP) needs a custom_jvp variant."""
  x, w, _, kw = make(RESNET20[1])
  with pytest.raises(TypeError):
    jax.jvp(lambda w: oc.conv(x, w, **kw), (w,), (w,))
