"""`pullback="norms"` and `"sites"`: GradCosine from per-layer quantities equals the one of
the per-example (or sub-batch) gradients.

References in float64: a Python loop of `jax.grad` per example (norms and GC, via the brute
force D×D cosine matrix), and for the second order (the NIO step differentiates GC) the
gradient of GC through the `vmap` formulation. Models: dense, convolutions (strided, padded,
dilated) with a scanned stage, layer norm over tokens (matmuls on the ghost-norm path),
and the registry's scanned ResNet.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from nio_jax import cosine, formulation, models, per_example, per_example_norms


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))(x)) + x, None


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x))
    x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()(x)
    x = nn.Conv(3, (2, 2), padding="VALID", kernel_dilation=(2, 1))(x)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class TokenNet(nn.Module):
  """Tokens [B, T, D]: dense layers with T = 2 (T(d + p) < d·p: ghost norms) and layer norm."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(8)(x))
    x = nn.LayerNorm()(x)
    x = nn.Dense(8)(x)
    return nn.Dense(3)(jnp.mean(x, axis=1))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1))))


class Tied(nn.Module):
  """One kernel used twice: its per-example norm is not a sum over sites."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], x.shape[-1]))
    return jnp.tanh(jnp.tanh(x @ w) @ w)


def _setup(model, shape, b=6, classes=3):
  x = jax.random.normal(jax.random.key(1), (b, *shape), jnp.float64)
  variables = model.init(jax.random.key(0), x)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables["params"])
  y = jnp.arange(b) % classes

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]

  return loss_fn, params, {"x": x, "y": y}


CASES = {
  "mlp": lambda: _setup(MLP(), (4, 3)),
  "conv_scan": lambda: _setup(ConvNet(), (7, 7, 2)),
  "tokens_layernorm": lambda: _setup(TokenNet(), (2, 5)),
}


def _loop_grads(loss_fn, params, batch, b):
  one = lambda i: jax.tree_util.tree_map(lambda a: a[i : i + 1], batch)
  return [jax.grad(lambda p, i=i: loss_fn(p, one(i))[0])(params) for i in range(b)]


@pytest.mark.parametrize(
  "case,conv",
  [
    pytest.param(c, v, marks=pytest.mark.slow) if (c, v) == ("conv_scan", "none") else (c, v)
    for c in sorted(CASES)
    for v in ("none", "im2col")
  ],
)
def test_norms_and_gc_equal_loop_of_grads(case, conv):
  with jax.enable_x64(True):
    loss_fn, params, batch = CASES[case]()
    ref = _loop_grads(loss_fn, params, batch, 6)
    ref_norms = [np.sqrt(sum(np.sum(g**2) for g in jax.tree_util.tree_leaves(r))) for r in ref]
    gc_ref = cosine.gc_brute_force(jax.tree_util.tree_map(lambda *g: jnp.stack(g), *ref))
    st = cosine.gradcosine(loss_fn, params, batch, pullback="norms", conv=conv)
    np.testing.assert_allclose(st.grad_norms, ref_norms, rtol=1e-10)
    np.testing.assert_allclose(st.gc, gc_ref, rtol=1e-9)
    np.testing.assert_allclose(st.loss, loss_fn(params, batch).mean(), rtol=1e-12)


@pytest.mark.parametrize(
  "case",
  [pytest.param(c, marks=pytest.mark.slow) if c == "conv_scan" else c for c in sorted(CASES)],
)
def test_second_order_equals_per_example_gradients(case):
  """∂GC/∂params (what the NIO search differentiates) equals the vmap formulation's."""
  with jax.enable_x64(True):
    loss_fn, params, batch = CASES[case]()

    def grad_gc(pullback):
      f = lambda p: cosine.gradcosine_stats(loss_fn, p, batch, pullback=pullback, conv="im2col")
      return jax.grad(lambda p: f(p).gc + 0.1 * f(p).grad_norm)(params)

    got, want = grad_gc("norms"), grad_gc("vmap")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_ghost_path_is_taken_and_matches_materialised():
  """The token net's first two dense layers (T = 2, d = 5 or 8, p = 8) take the ghost norm."""
  with jax.enable_x64(True):
    loss_fn, params, batch = CASES["tokens_layernorm"]()
    sel, treedef = jax.tree_util.tree_flatten(params)
    rebuild = lambda s: jax.tree_util.tree_unflatten(treedef, s)
    *_, sites = per_example_norms.plan(loss_fn, sel, rebuild, batch)
    dots = [s for s in sites if s.eqn.primitive.name == "dot_general"]
    assert len(dots) == 3
    assert [per_example_norms.uses_ghost_norm(s) for s in dots] == [True, True, True]
    # the classifier (T = 1) too; every other site (bias adds, layer-norm scale and bias)
    # materialises its small per-example gradient
    assert sum(not per_example_norms.uses_ghost_norm(s) for s in sites) == 5


def test_forward_over_reverse_works():
  """MetaInit-style Hessian-vector products (jvp of grad) go through the norms form."""
  with jax.enable_x64(True):
    loss_fn, params, batch = CASES["mlp"]()

    def gc(p, pullback):
      return cosine.gradcosine_stats(loss_fn, p, batch, pullback=pullback).gc

    v = jax.tree_util.tree_map(jnp.ones_like, params)
    hvp = lambda pb: jax.jvp(jax.grad(lambda p: gc(p, pb)), (params,), (v,))[1]
    for a, b in zip(
      jax.tree_util.tree_leaves(hvp("norms")), jax.tree_util.tree_leaves(hvp("vmap"))
    ):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_registry_scanned_resnet():
  """The registry's default (scanned) ResNet without BN, 2 blocks per stage, float32,
  against vmap(grad)."""
  model = models.get("resnet20", depth=14, width=4, norm="none")
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  params = model.init(jax.random.key(1), x)["params"]
  batch = {"x": x, "y": jnp.arange(4)}

  def loss_fn(p, bt):
    logits = model.apply({"params": p}, bt["x"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), bt["y"][:, None], 1)[:, 0]

  got = cosine.gradcosine(loss_fn, params, batch, pullback="norms")
  want = cosine.gradcosine(loss_fn, params, batch, pullback="vmap")
  np.testing.assert_allclose(got.grad_norms, want.grad_norms, rtol=2e-4)
  np.testing.assert_allclose(got.gc, want.gc, rtol=2e-3, atol=1e-5)


def test_coupled_loss_refused_by_name():
  with jax.enable_x64(True):
    loss_fn, params, batch = CASES["mlp"]()
    coupled = lambda p, bt: loss_fn(p, bt) - jnp.mean(loss_fn(p, bt))
    with pytest.raises(ValueError, match="pullback='norms' needs per-example losses that do not"):
      cosine.gradcosine(coupled, params, batch, pullback="norms")


def test_tied_weights_refused_and_auto_falls_back(monkeypatch):
  """Where "auto" picks "norms" (`AUTO_NORMS_BACKENDS`), a loss it refuses runs the default."""
  monkeypatch.setattr(formulation, "AUTO_NORMS_BACKENDS", ("cpu",))
  with jax.enable_x64(True):
    model = Tied()
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = lambda p, bt: jnp.sum(model.apply({"params": p}, bt) ** 2, axis=1)
    with pytest.raises(per_example_norms.NormsUnsupported, match=r"\['w'\].*more than one"):
      cosine.gradcosine(loss_fn, params, x, pullback="norms")
    form = formulation.resolve_formulation(loss_fn, params, x, None, backend="cpu")
    assert form.pullback == "norms" and form.fallback.pullback == "vmap"
    got = cosine.gradcosine(loss_fn, params, x, pullback="auto")
    want = cosine.gradcosine(loss_fn, params, x, pullback="vmap")
    np.testing.assert_allclose(got.gc, want.gc, rtol=1e-12)


def test_unsupported_use_named():
  """A leaf used by an operation that is not linear in it (here `exp(W)`) is named."""
  with jax.enable_x64(True):
    w = {"w": jnp.ones((3, 2))}
    x = jnp.arange(12.0).reshape(6, 2) / 10
    loss_fn = lambda p, bt: jnp.sum(jnp.tanh(bt @ jnp.exp(p["w"]).T), axis=1)
    with pytest.raises(per_example_norms.NormsUnsupported, match=r"\['w'\]: it is used by `exp`"):
      cosine.gradcosine(loss_fn, w, x, pullback="norms")


def test_per_example_grads_refuses_norms():
  loss_fn, params, batch = CASES["mlp"]()
  with pytest.raises(ValueError, match="never the gradients"):
    nio_jax.per_example_grads(loss_fn, params, batch, pullback="norms")


def test_batch_setting_refuses_norms():
  loss_fn, params, batch = CASES["mlp"]()
  with pytest.raises(ValueError, match="pullback='norms' does not exist in the batch setting"):
    cosine.gradcosine(loss_fn, params, batch, num_chunks=2, pullback="norms")


# `pullback="sites"` (batch setting): the segments' gradients from one forward and backward.


def _subbatch_ref(loss_fn, params, batch, b, d, r):
  bounds = per_example.subbatch_bounds(b, d, r)
  return [jax.grad(lambda p, a=a, e=e: loss_fn(p, batch)[a:e].mean())(params) for a, e in bounds]


@pytest.mark.parametrize(
  "case",
  [pytest.param(c, marks=pytest.mark.slow) if c == "conv_scan" else c for c in sorted(CASES)],
)
def test_sites_subbatch_grads_and_second_order(case):
  """Sub-batch gradients against a loop of `jax.grad`; ∂(GC + 0.1·gn)/∂params against the
  `loop` formulation (one forward, D backwards)."""
  with jax.enable_x64(True):
    loss_fn, params, batch = {
      "mlp": lambda: _setup(MLP(), (4, 3), b=10),
      "conv_scan": lambda: _setup(ConvNet(), (7, 7, 2), b=10),
      "tokens_layernorm": lambda: _setup(TokenNet(), (2, 5), b=10),
    }[case]()
    ref = _subbatch_ref(loss_fn, params, batch, 10, 3, 0.2)
    form = formulation.resolve_formulation(loss_fn, params, batch, 3, "sites", "none")
    losses, got = per_example.subbatch_grads_selected(loss_fn, params, batch, 3, 0.2, form)
    np.testing.assert_allclose(losses, loss_fn(params, batch), rtol=1e-12)
    for i, r in enumerate(ref):
      for g, want in zip(got, jax.tree_util.tree_leaves(r)):
        np.testing.assert_allclose(g[i], want, rtol=1e-9, atol=1e-12)

    def grad_gc(pullback):
      f = lambda p: cosine.gradcosine_stats(
        loss_fn, p, batch, num_chunks=3, overlap=0.2, pullback=pullback, conv="im2col"
      )
      return jax.grad(lambda p: f(p).gc + 0.1 * f(p).grad_norm)(params)

    for a, b in zip(
      jax.tree_util.tree_leaves(grad_gc("sites")), jax.tree_util.tree_leaves(grad_gc("loop"))
    ):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_sites_refusals_name_the_pullback():
  with jax.enable_x64(True):
    model = Tied()
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = lambda p, bt: jnp.sum(model.apply({"params": p}, bt) ** 2, axis=1)
    with pytest.raises(
      per_example_norms.NormsUnsupported,
      match=r"pullback='sites' cannot use parameter leaf \['w'\].*more than one.*'segments'",
    ):
      cosine.gradcosine(loss_fn, params, x, num_chunks=2, pullback="sites")
    loss_fn, params, batch = CASES["mlp"]()
    sel, treedef = jax.tree_util.tree_flatten(params)
    rebuild = lambda s: jax.tree_util.tree_unflatten(treedef, s)
    with pytest.raises(ValueError, match=r"do not cut \[0, 6\) in order"):
      per_example_norms.segment_sums(loss_fn, sel, rebuild, batch, [(0, 2), (3, 6)])
    coupled = lambda p, bt: loss_fn(p, bt) - jnp.mean(loss_fn(p, bt))
    with pytest.raises(ValueError, match="pullback='sites' is exact only for models without"):
      cosine.gradcosine(coupled, params, batch, num_chunks=2, pullback="sites")
