"""MetaInit: the gradient quotient and its Hessian-vector product against an explicit Hessian,
and the paper's sign-momentum update against a plain implementation on the params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nio_jax.methods import (
  MetaInitConfig,
  gradient_quotient,
  hessian_vector_product,
  metainit,
  random_batches,
)
from nio_jax.methods.metainit import is_shape_spec, random_batch
from tests import tiny_models as tm
from tests.reference import RefRescaleAdam

SIZES = (3, 4, 2)
EPS = 1e-5


@pytest.fixture(scope="module")
def setup():
  params = tm.mlp_params(jax.random.PRNGKey(5), SIZES)
  batches = [
    tm.mlp_batch(jax.random.PRNGKey(6 + i), b=6, d=SIZES[0], c=SIZES[-1]) for i in range(2)
  ]
  return params, batches


@jax.jit
def brute_force(params, batch):
  """GQ, g and H g from the explicit Hessian of the flattened params."""
  flat, unravel = ravel_pytree(params)
  f = lambda v: jnp.mean(tm.mlp_loss(unravel(v), batch))
  g = jax.grad(f)(flat)
  h = jax.hessian(f)(flat)
  hg = h @ g
  sign = jnp.where(g >= 0, 1.0, -1.0)
  gq = jnp.mean(jnp.abs((g - hg) / (g + EPS * sign) - 1.0))
  return gq, g, h, hg


def test_gq_and_hvp_match_explicit_hessian(setup):
  params, (batch, _) = setup
  gq_bf, g, h, hg = brute_force(params, batch)
  gq, aux = jax.jit(lambda p, b: gradient_quotient(tm.mlp_loss, p, b, eps=EPS))(params, batch)
  np.testing.assert_allclose(float(gq), float(gq_bf), rtol=1e-5)
  np.testing.assert_allclose(float(aux["grad_norm"]), float(jnp.linalg.norm(g)), rtol=1e-6)
  unravel = ravel_pytree(params)[1]
  hvp_fn = jax.jit(
    lambda v: ravel_pytree(hessian_vector_product(tm.mlp_loss, params, batch, unravel(v)))[0]
  )
  np.testing.assert_allclose(np.asarray(hvp_fn(g)), np.asarray(hg), rtol=1e-5, atol=1e-7)
  v = jax.random.normal(jax.random.PRNGKey(9), g.shape)
  hvp_v = hvp_fn(v)
  np.testing.assert_allclose(np.asarray(hvp_v), np.asarray(h @ v), rtol=1e-5, atol=1e-7)
  # ... and ∇θ(½‖g‖²) = H g, the paper's formulation.
  half_sq = jax.jit(
    jax.grad(
      lambda p: (
        0.5
        * sum(
          jnp.sum(x**2)
          for x in jax.tree_util.tree_leaves(jax.grad(lambda q: jnp.mean(tm.mlp_loss(q, batch)))(p))
        )
      )
    )
  )(params)
  np.testing.assert_allclose(
    np.asarray(ravel_pytree(half_sq)[0]), np.asarray(hg), rtol=1e-5, atol=1e-7
  )


def test_gq_gradient_matches_explicit_hessian(setup):
  """d GQ / dθ through the jvp-based HVP equals the gradient of the brute-force GQ."""
  params, (batch, _) = setup
  g1 = jax.jit(jax.grad(lambda p: gradient_quotient(tm.mlp_loss, p, batch, eps=EPS)[0]))(params)
  g2 = jax.jit(jax.grad(lambda p: brute_force(p, batch)[0]))(params)
  np.testing.assert_allclose(
    np.asarray(ravel_pytree(g1)[0]), np.asarray(ravel_pytree(g2)[0]), rtol=1e-4, atol=1e-6
  )


@pytest.mark.parametrize("hvp", ["linearize", "vjp"])
def test_hvp_forms_agree_with_jvp_and_explicit_hessian(setup, hvp):
  """Every `hvp` form gives the jvp form's GQ, aux and d GQ / dθ, and the explicit Hessian's
  GQ; a leaf outside `grad_filter` stays out of g and Hg in every form."""
  params, (batch, _) = setup
  gq_bf = brute_force(params, batch)[0]

  def gq(p, form, filt=None):
    return gradient_quotient(tm.mlp_loss, p, batch, eps=EPS, hvp=form, grad_filter=filt)

  (v1, a1), g1 = jax.jit(jax.value_and_grad(lambda p: gq(p, "jvp"), has_aux=True))(params)
  (v2, a2), g2 = jax.jit(jax.value_and_grad(lambda p: gq(p, hvp), has_aux=True))(params)
  np.testing.assert_allclose(float(v2), float(v1), rtol=1e-6)
  np.testing.assert_allclose(float(v2), float(gq_bf), rtol=1e-5)
  for k in a1:
    np.testing.assert_allclose(float(a2[k]), float(a1[k]), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(ravel_pytree(g2)[0]), np.asarray(ravel_pytree(g1)[0]), rtol=1e-4, atol=1e-7
  )
  kernels_only = lambda path, leaf: leaf.ndim >= 2  # noqa: E731
  f1 = jax.jit(lambda p: gq(p, "jvp", kernels_only)[0])(params)
  f2 = jax.jit(lambda p: gq(p, hvp, kernels_only)[0])(params)
  np.testing.assert_allclose(float(f2), float(f1), rtol=1e-6)
  assert abs(float(f1) - float(v1)) > 1e-6  # the filter changes GQ, so the check can fail


def test_hvp_config_is_validated():
  with pytest.raises(ValueError, match="hvp"):
    MetaInitConfig.create(hvp="finite_differences")


def plain_metainit(params, batches, steps, lr=0.1, momentum=0.9):
  """The paper's listing on the params themselves (no scales)."""
  memory = jax.tree_util.tree_map(lambda _: 0.0, params)
  gq_grad = jax.jit(jax.grad(lambda p, b: brute_force(p, b)[0]))
  for i in range(steps):
    grads = gq_grad(params, batches[i % len(batches)])

    def upd(p, g, m):
      if p.ndim < 2:
        return p, m
      norm = jnp.linalg.norm(p)
      d = jnp.sign(jnp.sum(p * g) / norm)
      m = momentum * m - lr * d
      return p * (norm + m) / norm, m

    out = jax.tree_util.tree_map(upd, params, grads, memory)
    params = jax.tree_util.tree_map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))
    memory = jax.tree_util.tree_map(lambda o: o[1], out, is_leaf=lambda x: isinstance(x, tuple))
  return params


def test_sign_momentum_matches_paper_listing(setup):
  params, batches = setup
  res = metainit(tm.mlp_loss, params, batches, dict(num_steps=3))
  want = plain_metainit(params, batches, 3)
  for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # Only ≥ 2-dim leaves move; scales = final / initial norm.
  for name in ("dense0", "dense1"):
    assert float(res.scales[name]["bias"]) == 1.0
    np.testing.assert_allclose(
      float(res.scales[name]["kernel"]),
      float(jnp.linalg.norm(res.params[name]["kernel"]) / jnp.linalg.norm(params[name]["kernel"])),
      rtol=1e-5,
    )
  assert res.history["gq"].shape == (3,) and res.method == "metainit"
  assert res.config["lr"] == 0.1 and res.config["variant"] == "sign_momentum"


@pytest.mark.parametrize("hvp", ["linearize", "vjp"])
def test_hvp_config_reaches_the_step(setup, hvp, monkeypatch):
  """`MetaInitConfig.hvp` is what the search runs: the step is traced with that form, and
  the paper's listing with it gives the jvp form's params and GQ history."""
  import importlib

  params, batches = setup
  want = metainit(tm.mlp_loss, params, batches, dict(num_steps=3))
  mi = importlib.import_module("nio_jax.methods.metainit")
  seen, real = [], mi.grad_and_hvp

  def spy(f, p, m, form="jvp"):
    seen.append(form)
    return real(f, p, m, form)

  monkeypatch.setattr(mi, "grad_and_hvp", spy)
  got = metainit(tm.mlp_loss, params, batches, dict(num_steps=3, hvp=hvp))
  assert seen and set(seen) == {hvp}
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.history["gq"], want.history["gq"], rtol=1e-5)
  assert got.config["hvp"] == hvp


def test_random_inputs_spec(setup):
  params, _ = setup
  spec = {"x": (6, SIZES[0]), "num_classes": SIZES[-1], "label_key": "y"}
  assert is_shape_spec(spec) and not is_shape_spec({"x": np.zeros((6, 3))})
  bs = list(random_batches(spec, seed=3, num_steps=2))
  assert bs[0]["x"].shape == (6, 3) and bs[0]["y"].dtype == jnp.int32
  assert int(bs[0]["y"].min()) >= 0 and int(bs[0]["y"].max()) < SIZES[-1]
  assert not np.array_equal(bs[0]["x"], bs[1]["x"])  # fresh batch per step
  again = list(random_batches(spec, seed=3, num_steps=2))
  np.testing.assert_array_equal(bs[1]["x"], again[1]["x"])  # deterministic
  res = metainit(tm.mlp_loss, params, spec, dict(num_steps=2, seed=3))
  assert res.history["gq"].shape == (2,)
  with pytest.raises(ValueError, match="disagree on the batch size"):
    random_batch({"x": (6, 3), "z": (5, 3)}, jax.random.PRNGKey(0))


def test_rescale_adam_variant(setup):
  """RescaleAdam on GQ (objective steps only) against the explicit-Hessian GQ and a numpy
  RescaleAdam, step by step (values, not bounds)."""
  params, batches = setup
  steps, lr = 4, 0.01
  res = metainit(tm.mlp_loss, params, batches, dict(num_steps=steps, variant="rescale_adam", lr=lr))
  assert res.config["lr"] == lr
  keys = [(m, k) for m in ("dense0", "dense1") for k in ("bias", "kernel")]

  def gq_of_scales(s, batch):
    p = {m: {k: s[(m, k)] * params[m][k] for k in ("bias", "kernel")} for m in params}
    return brute_force(p, batch)[0]

  opt = RefRescaleAdam(keys, lr)
  s = dict.fromkeys(keys, 1.0)
  gqs = []
  for t in range(steps):
    gq, g = jax.value_and_grad(gq_of_scales)(
      {k: jnp.float32(v) for k, v in s.items()}, batches[t % len(batches)]
    )
    gqs.append(float(gq))
    s = opt.step(s, g, False)
  np.testing.assert_allclose(res.history["gq"], gqs, rtol=1e-4)
  for m, k in keys:  # every non-zero leaf is tuned, biases too
    assert float(res.scales[m][k]) == pytest.approx(s[(m, k)], rel=1e-4), (m, k)
    assert s[(m, k)] != 1.0
  assert MetaInitConfig.create(dict(variant="rescale_adam")).learning_rate == 1e-3


def test_default_num_steps_per_variant():
  """Paper: 500 steps. GradInit authors' baseline: one pass of their CIFAR-10 loader at
  batch 128, ⌈50000/128⌉ = 391 steps. An explicit value wins."""
  assert MetaInitConfig.create().num_steps == 500
  assert MetaInitConfig.create(dict(variant="rescale_adam")).num_steps == 391
  assert MetaInitConfig(variant="rescale_adam").num_steps == 391
  assert MetaInitConfig.create(dict(variant="rescale_adam", num_steps=7)).num_steps == 7
  assert MetaInitConfig.create(dict(variant="rescale_adam")).to_dict()["num_steps"] == 391


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(lr=0.0), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(num_steps=0), "num_steps"),
    (dict(eps=0.0), "eps"),
    (dict(momentum=1.0), "momentum"),
    (dict(variant="adam"), "variant"),
    (dict(steps=3), "unknown MetaInit config key"),
  ],
)
def test_bad_config(bad, match):
  with pytest.raises(ValueError, match=match):
    MetaInitConfig.create(bad)


def test_bad_input(setup):
  params, batches = setup
  with pytest.raises(TypeError, match="not a single batch"):
    metainit(tm.mlp_loss, params, batches[0], dict(num_steps=1))
  with pytest.raises(ValueError, match="per-example losses"):
    metainit(lambda p, b: jnp.mean(tm.mlp_loss(p, b)), params, batches, dict(num_steps=1))
