"""Canonical convolutions (`jaxpr_rewrites.canonical_convs`): the fix for the scanned layout's
slow backward pass on XLA:CPU. Values must equal the plain convolutions; the compiled HLO of a
scanned gradient must contain only canonical convolutions (NHWC / HWIO -> NHWC), which is
what lets XLA:CPU use its library kernel inside a while-loop body."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from nio_jax import models, scales
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.jaxpr_rewrites import canonical_conv, canonical_convs

CANONICAL = "b01f_01io->b01f"


def dim_labels(fn, *args):
  txt = jax.jit(fn).lower(*args).compile().as_text()
  return set(re.findall(r"dim_labels=([^,}\s]+)", txt))


def scan_chain(ws, x):
  def body(h, w):
    y = jax.lax.conv_general_dilated(
      h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return h + jnp.tanh(y), None

  h, _ = jax.lax.scan(body, x, ws)
  return jnp.sum(h**2)


def chain_args():
  ws = 0.2 * jax.random.normal(jax.random.key(0), (3, 3, 3, 4, 4))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  return ws, x


@pytest.mark.parametrize(
  "dn,strides,pad,lhs_dil,rhs_dil,groups",
  [
    (("NHWC", "HWIO", "NHWC"), (1, 1), ((1, 1), (1, 1)), None, None, 1),
    (("NCHW", "OIHW", "NCHW"), (2, 1), ((0, 1), (2, 0)), None, (1, 2), 1),
    (("NHWC", "HWOI", "NHWC"), (1, 1), ((1, 1), (1, 1)), (2, 2), None, 1),
    (("CHWN", "IHWO", "HWNC"), (1, 2), ((1, 1), (0, 0)), None, None, 1),
    (("NHWC", "HWIO", "NHWC"), (1, 1), ((1, 1), (1, 1)), None, None, 2),
  ],
)
def test_canonical_conv_equals_conv(dn, strides, pad, lhs_dil, rhs_dil, groups):
  k1, k2 = jax.random.split(jax.random.key(3))
  lhs_shape = {"N": 2, "C": 4, "H": 6, "W": 7}
  rhs_shape = {"O": 6, "I": 4 // groups, "H": 3, "W": 2}
  lhs = jax.random.normal(k1, tuple(lhs_shape[c] for c in dn[0]))
  rhs = jax.random.normal(k2, tuple(rhs_shape[c] for c in dn[1]))
  dnums = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
  kw = dict(
    window_strides=strides,
    padding=pad,
    lhs_dilation=lhs_dil,
    rhs_dilation=rhs_dil,
    dimension_numbers=dnums,
    feature_group_count=groups,
  )
  want = jax.lax.conv_general_dilated(lhs, rhs, **kw, precision="highest")
  got = canonical_conv(lhs, rhs, **kw, precision="highest")
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scanned_gradient_uses_only_canonical_convs():
  ws, x = chain_args()
  g = jax.grad(scan_chain)
  # Without the rewrite the backward convs inside the loop body are not canonical: this is
  # what sends XLA:CPU to its slow generic kernel.
  assert dim_labels(g, ws, x) - {CANONICAL}
  fixed = canonical_convs(g, backends=None)
  assert dim_labels(fixed, ws, x) == {CANONICAL}
  np.testing.assert_allclose(jax.jit(fixed)(ws, x), jax.jit(g)(ws, x), rtol=2e-5, atol=1e-6)


def non_canonical_convs(fn, *args):
  """The compiled convolutions that are not canonical, minus XLA's own operand swaps."""
  txt = jax.jit(fn).lower(*args).compile().as_text()
  convs = [line for line in txt.splitlines() if " convolution(" in line]
  return [c for c in convs if CANONICAL not in c and "rhs_reversal" not in c]


def test_canonical_convs_second_order_and_static_args():
  ws, x = chain_args()

  def gnorm(scale, ws, x, power):  # a gradient inside a gradient (as the NIO step)
    g = jax.grad(scan_chain)(scale * ws, x)
    return jnp.sum(g**2) ** (1 / power)

  f = jax.grad(gnorm)
  fixed = jax.jit(canonical_convs(f, backends=None), static_argnums=(3,))
  want = jax.jit(f, static_argnums=(3,))(1.3, ws, x, 2)
  np.testing.assert_allclose(fixed(1.3, ws, x, 2), want, rtol=1e-4)
  assert non_canonical_convs(lambda s, w, x: f(s, w, x, 2), 1.3, ws, x)
  # XLA swaps the operands of one double-backward conv (rhs_reversal); every other is canonical.
  fixed2 = canonical_convs(lambda s, w, x: f(s, w, x, 2), backends=None)
  assert non_canonical_convs(fixed2, 1.3, ws, x) == []


def test_canonical_convs_inside_cond_branches():
  """Convolutions inside `lax.cond` branches (GradInit's constraint / objective step) are
  rewritten too, with the same values on both branches."""
  ws, x = chain_args()

  def f(pred, ws, x):
    def a(ws, x):
      return jax.grad(scan_chain)(ws, x)

    def b(ws, x):
      return jax.grad(scan_chain)(2.0 * ws, x)

    return jax.lax.cond(pred, a, b, ws, x)

  assert dim_labels(f, True, ws, x) - {CANONICAL}
  fixed = canonical_convs(f, backends=None)
  assert dim_labels(fixed, True, ws, x) == {CANONICAL}
  for pred in (True, False):
    np.testing.assert_allclose(
      jax.jit(fixed)(pred, ws, x), jax.jit(f)(pred, ws, x), rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["im2col", "slices"])
def test_rewrite_convs_inside_cond_with_branch_constants(mode):
  """`rewrite_convs` also rewrites a convolution inside a `lax.cond` branch that closes over
  an array (non-empty branch constants): values and gradients on both branches."""
  from nio_jax.jaxpr_rewrites import rewrite_convs

  ws, x = chain_args()
  bias = jnp.arange(4.0) / 10  # closed over by one branch

  def conv(h, w):
    return jax.lax.conv_general_dilated(
      h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def f(w, x, pred):
    return jax.lax.cond(
      pred,
      lambda w, x: jnp.sum(jnp.tanh(conv(x, w) + bias) ** 2),
      lambda w, x: jnp.sum(conv(x, 2.0 * w) ** 2),
      w,
      x,
    )

  fixed = rewrite_convs(f, mode)
  jaxpr = jax.make_jaxpr(fixed)(ws[0], x, True)
  assert "conv_general_dilated" not in str(jaxpr)
  for pred in (True, False):
    np.testing.assert_allclose(
      jax.jit(fixed)(ws[0], x, pred), jax.jit(f)(ws[0], x, pred), rtol=1e-5
    )
    g1 = jax.jit(jax.grad(fixed))(ws[0], x, pred)
    g2 = jax.jit(jax.grad(f))(ws[0], x, pred)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)


def test_canonical_convs_only_on_listed_backends():
  ws, x = chain_args()
  g = jax.grad(scan_chain)
  other = canonical_convs(g, backends=("no-such-backend",))
  assert dim_labels(other, ws, x) == dim_labels(g, ws, x)


def test_nio_step_on_scanned_resnet_uses_canonical_convs():
  """The library's NIO step (lax convs, batch setting) on a scanned ResNet: every conv of
  the compiled step is canonical on CPU (apart from XLA's own operand swaps)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the rewrite is applied on XLA:CPU only")
  model = models.CifarResNet(depth=14, width=4, norm="none", scan=True)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  y = jnp.arange(4) % 10
  variables = model.init(jax.random.key(1), x)
  loss_fn = linen_loss_fn(model)
  params = variables["params"]
  sc, spec = scales.init_scales(params)
  search = nio_jax.make_nio_step(
    loss_fn, spec, dict(num_chunks=2, overlap=0.0, pullback="loop", conv="none")
  )
  batch = {"image": x, "label": y}
  assert non_canonical_convs(search.step, params, sc, search.init(sc), batch) == []
