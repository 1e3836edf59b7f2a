"""The composable public functions work under `jit`, `vmap` and `grad` with their default
arguments (their input checks run on concrete values and skip tracers), give the values of the
eager call, and still raise the clear error on bad concrete input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from tests import tiny_models as tm

P = tm.mlp_params(jax.random.PRNGKey(0))
BATCH = tm.mlp_batch(jax.random.PRNGKey(1))
S0, _ = nio_jax.init_scales(P)
S1 = jax.tree_util.tree_map(lambda s: 0.5 * s + 0.25, S0)
STACK = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), S0, S1)


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def gc_of(s):
  return nio_jax.gradcosine(tm.mlp_loss, nio_jax.apply_scales(P, s), BATCH).gc


def gc_reference(s):
  """GradCosine from a Python loop of jax.grad calls and the explicit cosine matrix."""
  params = jax.tree_util.tree_map(lambda p, c: p * c, P, s)
  rows = []
  for i in range(BATCH["x"].shape[0]):
    one = jax.tree_util.tree_map(lambda x: x[i : i + 1], BATCH)
    g = jax.grad(lambda p: tm.mlp_loss(p, one)[0])(params)
    rows.append(jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
  return nio_jax.gc_brute_force({"g": jnp.stack(rows)})


def test_gradcosine_jit_vmap_grad():
  eager = [float(gc_reference(S0)), float(gc_reference(S1))]
  np.testing.assert_allclose(float(jax.jit(gc_of)(S0)), eager[0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.vmap(gc_of)(STACK)), eager, rtol=1e-5)
  g = jax.grad(gc_of)(S1)
  _close(g, jax.grad(gc_reference)(S1), rtol=1e-4, atol=1e-6)
  _close(jax.jit(jax.grad(gc_of))(S1), g, rtol=1e-5)


def test_per_example_grads_jit_vmap_grad():
  def peg(s):
    return nio_jax.per_example_grads(tm.mlp_loss, nio_jax.apply_scales(P, s), BATCH)

  def loop(s):
    params = jax.tree_util.tree_map(lambda p, c: p * c, P, s)
    rows = [
      jax.grad(
        lambda p, i=i: tm.mlp_loss(p, jax.tree_util.tree_map(lambda x: x[i : i + 1], BATCH))[0]
      )(params)
      for i in range(BATCH["x"].shape[0])
    ]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows)

  _close(jax.jit(peg)(S0), loop(S0))
  stacked = jax.vmap(peg)(STACK)
  _close(jax.tree_util.tree_map(lambda x: x[1], stacked), loop(S1))
  total = lambda f: lambda s: sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(f(s)))
  _close(jax.grad(total(peg))(S1), jax.grad(total(loop))(S1), rtol=1e-4)


def test_apply_scales_jit_vmap_grad():
  manual = lambda s: jax.tree_util.tree_map(lambda p, c: p * c, P, s)
  _close(jax.jit(nio_jax.apply_scales)(P, S1), manual(S1))
  out = jax.vmap(lambda s: nio_jax.apply_scales(P, s))(STACK)
  _close(jax.tree_util.tree_map(lambda x: x[1], out), manual(S1))
  g = jax.grad(lambda s: nio_jax.apply_scales(P, s)["dense0"]["kernel"].sum())(S1)
  np.testing.assert_allclose(
    float(g["dense0"]["kernel"]), float(P["dense0"]["kernel"].sum()), rtol=1e-5
  )
  assert float(g["dense1"]["kernel"]) == 0.0


def test_init_scales_jit_vmap_grad():
  params = {**P, "zero": {"bias": jnp.zeros(3)}}
  scales, spec = jax.jit(nio_jax.init_scales)(params)
  assert bool(spec.trainable["dense0"]["kernel"]) and not bool(spec.trainable["zero"]["bias"])
  np.testing.assert_allclose(float(spec.min_scale["dense0"]["kernel"]), 0.01, rtol=1e-6)
  assert float(spec.min_scale["dense0"]["bias"]) == 0.0
  _close(scales, jax.tree_util.tree_map(lambda _: 1.0, scales))
  two = jax.tree_util.tree_map(lambda x: jnp.stack([x, 0 * x]), params)
  _, vspec = jax.vmap(lambda q: nio_jax.init_scales(q))(two)
  np.testing.assert_array_equal(np.asarray(vspec.trainable["dense0"]["kernel"]), [True, False])
  g = jax.grad(
    lambda q: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(nio_jax.init_scales(q)[0]))
  )(P)
  _close(g, jax.tree_util.tree_map(jnp.zeros_like, P))


def test_gc_from_grads_jit_vmap_grad():
  g = {
    "a": jax.random.normal(jax.random.PRNGKey(2), (5, 3, 2)),
    "b": jnp.arange(10.0).reshape(5, 2),
  }
  gc = lambda x: nio_jax.gc_from_grads(x)[0]
  np.testing.assert_allclose(float(jax.jit(gc)(g)), float(nio_jax.gc_brute_force(g)), rtol=1e-5)
  two = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x + 1.0]), g)
  want = [
    float(nio_jax.gc_brute_force(jax.tree_util.tree_map(lambda x: x[i], two))) for i in (0, 1)
  ]
  np.testing.assert_allclose(np.asarray(jax.vmap(gc)(two)), want, rtol=1e-5)
  _close(jax.grad(gc)(g), jax.grad(nio_jax.gc_brute_force)(g), rtol=1e-4, atol=1e-6)


def test_bad_concrete_input_still_raises_clear_error():
  bad = {**BATCH, "x": BATCH["x"].at[0, 0].set(jnp.nan)}
  with pytest.raises(ValueError, match="batch contains NaN or inf"):
    jax.jit(lambda s: nio_jax.gradcosine(tm.mlp_loss, nio_jax.apply_scales(P, s), bad).gc)(S0)
  with pytest.raises(ValueError, match="batch contains NaN or inf"):
    nio_jax.per_example_grads(tm.mlp_loss, P, bad)
  nan_scales = jax.tree_util.tree_map(lambda s: s * jnp.nan, S0)
  with pytest.raises(ValueError, match="is NaN or inf"):
    nio_jax.apply_scales(P, nan_scales)
  with pytest.raises(ValueError, match="no scalable leaf"):
    nio_jax.init_scales(jax.tree_util.tree_map(jnp.zeros_like, P))
  with pytest.raises(ValueError, match="at least 2"):
    jax.jit(lambda x: nio_jax.gc_from_grads(x)[0])({"a": jnp.ones((1, 3))})
  with pytest.raises(ValueError, match="disagree on the number of gradients"):
    nio_jax.gc_from_grads({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))})
  with pytest.raises(TypeError, match="floating point"):
    jax.jit(lambda s: nio_jax.apply_scales(P, s))(jax.tree_util.tree_map(lambda s: 1, S0))
