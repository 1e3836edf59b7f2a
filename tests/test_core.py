"""Core maths checked against brute force: per-example gradients, GradCosine, sub-batches,
scales, the scale optimiser and the NIO step."""

import itertools

import chex
import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nio_jax
from nio_jax import formulation
from nio_jax.cosine import gc_from_grads
from nio_jax.methods.nio import OBJECTIVES
from tests import tiny_models as tm
from tests.reference import RefRescaleAdam

KEY = jax.random.PRNGKey(0)


def loop_grads(loss_fn, params, batch):
  """Brute force: one jax.grad call per example."""
  b = batch["y"].shape[0]
  out = []
  for i in range(b):
    ex = jax.tree_util.tree_map(lambda x: x[i : i + 1], batch)
    out.append(jax.grad(lambda p: loss_fn(p, ex)[0])(params))
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *out)


def flat(grads):
  leaves = jax.tree_util.tree_leaves(grads)
  d = leaves[0].shape[0]
  return np.concatenate([np.reshape(np.asarray(g, np.float64), (d, -1)) for g in leaves], 1)


def cosine_matrix_mean(g):
  g = flat(g)
  d = g.shape[0]
  total = 0.0
  for i, j in itertools.product(range(d), range(d)):
    if i != j:
      total += g[i] @ g[j] / (np.linalg.norm(g[i]) * np.linalg.norm(g[j]))
  return total / (d * (d - 1))


CASES = [
  ("mlp", tm.mlp_params, tm.mlp_loss, tm.mlp_batch),
  ("conv", tm.conv_params, tm.conv_loss, tm.conv_batch),
]


@pytest.mark.parametrize("name,mkp,loss,mkb", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
  "pullback,chunk", [("vmap", None), ("vmap", 3), ("map", None), ("vjp", None), ("vjp", 4)]
)
def test_per_example_grads_equal_loop_of_grad(name, mkp, loss, mkb, pullback, chunk):
  params, batch = mkp(KEY), mkb(jax.random.PRNGKey(1), b=6)
  got = nio_jax.per_example_grads(loss, params, batch, pullback=pullback, chunk_size=chunk)
  want = loop_grads(loss, params, batch)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_per_example_grads_wrt_filter_zeroes_rejected_leaves():
  params, batch = tm.mlp_params(KEY), tm.mlp_batch(KEY)
  got = nio_jax.per_example_grads(
    tm.mlp_loss, params, batch, wrt=lambda path, leaf: path[-1].key == "kernel"
  )
  want = loop_grads(tm.mlp_loss, params, batch)
  chex.assert_trees_all_close(
    got["dense0"]["kernel"], want["dense0"]["kernel"], rtol=1e-5, atol=1e-7
  )
  assert not np.any(np.asarray(got["dense1"]["bias"]))


@pytest.mark.parametrize("name,mkp,loss,mkb", CASES, ids=[c[0] for c in CASES])
def test_samplewise_gc_equals_bruteforce_cosine_matrix(name, mkp, loss, mkb):
  params, batch = mkp(KEY), mkb(jax.random.PRNGKey(2), b=7)
  stats = nio_jax.gradcosine(loss, params, batch)
  g = loop_grads(loss, params, batch)
  np.testing.assert_allclose(stats.gc, cosine_matrix_mean(g), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats.grad_norms, np.linalg.norm(flat(g), axis=1), rtol=1e-5)
  np.testing.assert_allclose(nio_jax.gc_brute_force(g), cosine_matrix_mean(g), rtol=1e-4)
  np.testing.assert_allclose(stats.loss, np.mean(loss(params, batch)), rtol=1e-6)


def reference_bounds(b, d, r):
  """The released code's slicing, applied to arange(B) (independent of subbatch_bounds)."""
  idx = list(range(b))
  length = int(b / d)
  out = []
  for i in range(d):
    if i == 0:
      s = idx[0 : int((1 + r) * length * 1)]
    elif i == d - 1:
      s = idx[int((1 - r) * length * i) :]
    else:
      s = idx[int((1 - r) * length * i) : int((1 + r) * length * (i + 1))]
    out.append((s[0], s[-1] + 1))
  return out


@pytest.mark.parametrize(
  "b,d,r",
  [
    (64, 4, 0.2),
    (64, 2, 0.0),
    (32, 4, 0.2),
    (128, 4, 0.2),
    (10, 3, 0.1),
    (7, 2, 0.5),
    (33, 5, 0.3),
    (16, 16, 0.0),
    (100, 7, 0.25),
    (64, 8, 0.9),
  ],
)
def test_subbatch_bounds_equal_reference_formula(b, d, r):
  assert nio_jax.subbatch_bounds(b, d, r) == reference_bounds(b, d, r)


def test_subbatch_bounds_published_example():
  assert nio_jax.subbatch_bounds(64, 4, 0.2) == [(0, 19), (12, 38), (25, 57), (38, 64)]


@pytest.mark.parametrize("pullback", formulation.SUBBATCH_PULLBACKS)
@pytest.mark.parametrize("name,mkp,loss,mkb", CASES, ids=[c[0] for c in CASES])
def test_batch_setting_equals_loop_over_subbatch_means(name, mkp, loss, mkb, pullback):
  params, batch = mkp(KEY), mkb(jax.random.PRNGKey(3), b=12)
  d, r = 4, 0.2
  stats = nio_jax.gradcosine(
    loss, params, batch, num_chunks=d, overlap=r, pullback=pullback, conv="none"
  )
  grads = []
  for a, e in nio_jax.subbatch_bounds(12, d, r):
    sub = jax.tree_util.tree_map(lambda x: x[a:e], batch)
    grads.append(jax.grad(lambda p: jnp.mean(loss(p, sub)))(params))
  g = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *grads)
  np.testing.assert_allclose(stats.gc, cosine_matrix_mean(g), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats.grad_norms, np.linalg.norm(flat(g), axis=1), rtol=1e-5)


def test_samplewise_is_batch_setting_with_d_equal_b():
  params, batch = tm.mlp_params(KEY), tm.mlp_batch(KEY, b=6)
  a = nio_jax.gradcosine(tm.mlp_loss, params, batch)
  b = nio_jax.gradcosine(tm.mlp_loss, params, batch, num_chunks=6, overlap=0.0)
  np.testing.assert_allclose(a.gc, b.gc, rtol=1e-5)
  np.testing.assert_allclose(a.grad_norms, b.grad_norms, rtol=1e-5)


@pytest.mark.parametrize("num_chunks,overlap", [(None, 0.0), (3, 0.2)])
def test_grad_of_gc_wrt_scales_matches_finite_differences(num_chunks, overlap):
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tm.conv_params(KEY))
    batch = tm.conv_batch(jax.random.PRNGKey(4), b=6)
    batch = {"x": batch["x"].astype(jnp.float64), "y": batch["y"]}
    scales, _ = nio_jax.init_scales(params)
    scales = jax.tree_util.tree_map(lambda s: s.astype(jnp.float64) * 1.1, scales)

    def f(s):
      p = nio_jax.apply_scales(params, s)
      return nio_jax.gradcosine(
        tm.conv_loss, p, batch, num_chunks=num_chunks, overlap=overlap, check=False
      ).gc

    g = jax.grad(f)(scales)
    leaves, treedef = jax.tree_util.tree_flatten(scales)
    h = 1e-5
    for i, leaf in enumerate(leaves):
      up = list(leaves)
      up[i] = leaf + h
      dn = list(leaves)
      dn[i] = leaf - h
      fd = (
        f(jax.tree_util.tree_unflatten(treedef, up)) - f(jax.tree_util.tree_unflatten(treedef, dn))
      ) / (2 * h)
      np.testing.assert_allclose(jax.tree_util.tree_leaves(g)[i], fd, rtol=1e-5, atol=1e-9)


def test_gc_identity_handles_zero_gradient_without_nan():
  g = {"w": jnp.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])}
  gc, norms = gc_from_grads(g)
  assert np.isfinite(gc)
  assert float(norms[1]) == 0.0
  # Its gradient is finite too.
  dg = jax.grad(lambda x: gc_from_grads({"w": x})[0])(g["w"])
  assert np.all(np.isfinite(dg))


# ----------------------------------------------------------------------------- scales


def test_init_scales_leaf_selection_and_bounds():
  params = {
    "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    "ln": {"scale": jnp.ones(3), "bias": jnp.full(3, 0.5)},
  }
  scales, spec = nio_jax.init_scales(params)
  chex.assert_trees_all_equal(scales, jax.tree_util.tree_map(lambda _: jnp.float32(1), params))
  assert bool(spec.trainable["dense"]["kernel"]) and not bool(spec.trainable["dense"]["bias"])
  assert bool(spec.trainable["ln"]["bias"])
  assert float(spec.min_scale["dense"]["kernel"]) == pytest.approx(0.01)
  assert float(spec.min_scale["ln"]["bias"]) == 0.0
  _, spec2 = nio_jax.init_scales(params, select=lambda path, leaf: path[0].key == "ln")
  assert not bool(spec2.trainable["dense"]["kernel"]) and bool(spec2.trainable["ln"]["scale"])


def test_stacked_scan_leaves_get_one_scale_per_block():
  params = {
    "stage2_scan": {
      "conv": {"kernel": jnp.stack([jnp.ones((3, 3)), jnp.zeros((3, 3)), 2 * jnp.ones((3, 3))])}
    },
    "head": {"kernel": jnp.ones((3, 2))},
  }
  scales, spec = nio_jax.init_scales(params)
  assert scales["stage2_scan"]["conv"]["kernel"].shape == (3,)
  np.testing.assert_array_equal(
    spec.trainable["stage2_scan"]["conv"]["kernel"], [True, False, True]
  )
  s = {
    "stage2_scan": {"conv": {"kernel": jnp.array([1.0, 2.0, 3.0])}},
    "head": {"kernel": jnp.float32(0.5)},
  }
  out = nio_jax.apply_scales(params, s)
  np.testing.assert_allclose(out["stage2_scan"]["conv"]["kernel"][2], 6 * np.ones((3, 3)))
  np.testing.assert_allclose(out["head"]["kernel"], 0.5 * np.ones((3, 2)))


def test_apply_scales_is_leafwise_product_and_keeps_dtype():
  params = {"a": jnp.ones((2,), jnp.bfloat16), "b": jnp.full((3,), 2.0)}
  out = nio_jax.apply_scales(params, {"a": jnp.float32(3.0), "b": jnp.float32(0.5)})
  assert out["a"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["b"], np.ones(3))


# ------------------------------------------------------------------------ optimiser / step


def _hand_rescale_adam(grads_seq, kinds, lr, s0=1.0, lo=0.01, b1=0.9, b2=0.999, eps=1e-8, clip=1.0):
  """Scalar RescaleAdam written out by hand (the released optimiser's rule)."""
  s, m = s0, {True: 0.0, False: 0.0}
  n = {True: 0, False: 0}
  v = 0.0
  for g, c in zip(grads_seq, kinds):
    g = max(min(g, clip), -clip)
    m[c] = b1 * m[c] + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    n[c] += 1
    bc1 = 1 - b1 ** n[c]
    bc2 = 1 - b2 ** (n[True] + n[False])
    s = max(s - lr / bc1 * m[c] / (np.sqrt(v / bc2) + eps), lo)
  return s


@pytest.mark.parametrize(
  "grads",
  [
    [0.3, -2.5, 0.7, 0.05, -0.4],
    # gradients near sqrt(eps): ε outside the square root matters (inside it: ~30 % off)
    [1e-4, -2e-4, 5e-5, 1e-4, -3e-5],
  ],
  ids=["unit", "tiny"],
)
def test_rescale_adam_equals_hand_rule_with_split_moments(grads):
  kinds = [False, True, False, True, False]
  spec = nio_jax.ScaleSpec(trainable={"w": jnp.array(True)}, min_scale={"w": jnp.float32(0.01)})
  tx = nio_jax.rescale_adam(0.1, spec)
  s = {"w": jnp.float32(1.0)}
  state = tx.init(s)
  for g, c in zip(grads, kinds):
    u, state = tx.update({"w": jnp.float32(g)}, state, s, is_constraint=jnp.array(c))
    s = optax.apply_updates(s, u)
  assert float(s["w"]) == pytest.approx(_hand_rescale_adam(grads, kinds, 0.1), rel=1e-5)


def test_rescale_adam_projects_and_freezes():
  spec = nio_jax.ScaleSpec(
    trainable={"w": jnp.array(True), "b": jnp.array(True), "z": jnp.array(False)},
    min_scale={"w": jnp.float32(0.5), "b": jnp.float32(0.0), "z": jnp.float32(0.01)},
  )
  tx = nio_jax.rescale_adam(10.0, spec)
  s = {"w": jnp.float32(1.0), "b": jnp.float32(1.0), "z": jnp.float32(1.0)}
  st = tx.init(s)
  g = {"w": jnp.float32(1.0), "b": jnp.float32(1.0), "z": jnp.float32(1.0)}
  u, st = tx.update(g, st, s, is_constraint=False)
  s = optax.apply_updates(s, u)
  assert float(s["w"]) == 0.5 and float(s["b"]) == 0.0 and float(s["z"]) == 1.0
  # A scale that reached 0 stays frozen (the released code skips zero-norm params).
  u, st = tx.update(
    {"w": jnp.float32(-1.0), "b": jnp.float32(-1.0), "z": jnp.float32(-1.0)},
    st,
    s,
    is_constraint=False,
  )
  s = optax.apply_updates(s, u)
  assert float(s["b"]) == 0.0 and float(s["w"]) > 0.5


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nio_steps_equal_hand_computation(objective):
  """Four objective steps against the explicit cosine matrix and a hand RescaleAdam: values
  (one Adam step only sees signs, so one step could not tell `gc_gn` from `gc_gn_sqrt`)."""
  params = tm.mlp_params(KEY)
  batches = [tm.mlp_batch(jax.random.PRNGKey(5 + i), b=8) for i in range(2)]
  steps, lr = 4, 0.05
  cfg = nio_jax.NIOConfig(
    num_steps=steps, num_chunks=4, overlap=0.2, gamma=100.0, lr=lr, objective=objective
  )
  res = nio_jax.nio(tm.mlp_loss, params, batches, cfg)
  keys = [(m, k) for m in sorted(params) for k in ("bias", "kernel")]

  def obj(s, batch):
    p = {m: {k: s[(m, k)] * params[m][k] for k in ("bias", "kernel")} for m in params}
    grads = []
    for a, e in [(0, 2), (1, 4), (3, 7), (4, 8)]:  # B = 8, D = 4, r = 0.2 by hand
      sub = jax.tree_util.tree_map(lambda x: x[a:e], batch)
      grads.append(
        jnp.concatenate(
          [
            jnp.ravel(x)
            for x in jax.tree_util.tree_leaves(jax.grad(lambda q: jnp.mean(tm.mlp_loss(q, sub)))(p))
          ]
        )
      )
    G = jnp.stack(grads)
    n = jnp.linalg.norm(G, axis=1)
    cos = (G @ G.T) / (n[:, None] * n[None])
    gc = (jnp.sum(cos) - jnp.trace(cos)) / 12
    return {"gc": -gc, "gc_gn": -gc - jnp.sum(n**2), "gc_gn_sqrt": -gc - jnp.sum(n)}[objective]

  opt = RefRescaleAdam(keys, lr)
  s = dict.fromkeys(keys, 1.0)
  for t in range(steps):
    g = jax.grad(obj)({k: jnp.float32(v) for k, v in s.items()}, batches[t % 2])
    s = opt.step(s, g, False)
  for m, k in keys:
    assert float(res.scales[m][k]) == pytest.approx(s[(m, k)], rel=1e-4), (m, k)
  assert not np.any(res.history["constraint"])


def test_constraint_branch_runs_above_gamma_and_lowers_grad_norm():
  params, batch = tm.mlp_params(KEY), tm.mlp_batch(jax.random.PRNGKey(6), b=16)
  res = nio_jax.nio(
    tm.mlp_loss, params, [batch], {"num_steps": 15, "gamma": 1e-3, "lr": 0.05, "num_chunks": 4}
  )
  assert np.all(res.history["constraint"])
  gn = res.history["grad_norm"]
  assert gn[-1] < gn[0]


def test_nio_gc_objective_raises_gc_on_fixed_batch():
  params, batch = tm.conv_params(KEY), tm.conv_batch(jax.random.PRNGKey(7), b=8)
  res = nio_jax.nio(
    tm.conv_loss,
    params,
    [batch],
    {
      "num_steps": 25,
      "gamma": 1e3,
      "lr": 0.05,
      "num_chunks": None,
      "overlap": 0.0,
      "objective": "gc",
    },
  )
  gc = res.history["gc"]
  assert np.mean(gc[-5:]) > np.mean(gc[:5])
  chex.assert_trees_all_close(res.params, nio_jax.apply_scales(params, res.scales))


def test_nio_is_deterministic():
  params = tm.mlp_params(KEY)
  batches = [tm.mlp_batch(jax.random.PRNGKey(i), b=8) for i in range(3)]
  a = nio_jax.nio(tm.mlp_loss, params, batches, {"num_steps": 5, "lr": 0.05})
  b = nio_jax.nio(tm.mlp_loss, params, batches, {"num_steps": 5, "lr": 0.05})
  chex.assert_trees_all_equal(a.scales, b.scales)
  chex.assert_trees_all_equal(a.params, b.params)


def test_measure_averages_batches():
  params = tm.mlp_params(KEY)
  batches = [tm.mlp_batch(jax.random.PRNGKey(i), b=8) for i in range(3)]
  m = nio_jax.measure(
    tm.mlp_loss, params, batches, num_batches=3, num_chunks=None, overlap=0.0, wrt=None
  )
  gcs = [float(nio_jax.gradcosine(tm.mlp_loss, params, b).gc) for b in batches]
  assert m["gc"] == pytest.approx(np.mean(gcs), rel=1e-5)
  assert m["num_batches"] == 3


def test_nio_step_compiles_once_across_calls():
  """Repeated `nio()` calls with the same loss_fn, shapes and step settings reuse one
  compiled step (counted by the traces of the loss function); a new step setting retraces."""
  traces = []

  def loss_fn(params, batch):
    traces.append(1)  # runs only while jax traces the function
    return tm.mlp_loss(params, batch)

  batches = [tm.mlp_batch(jax.random.fold_in(KEY, i), b=8) for i in range(3)]
  cfg = {"num_steps": 3, "num_chunks": 2, "overlap": 0.0}
  nio_jax.nio(loss_fn, tm.mlp_params(KEY), batches, cfg)
  first = len(traces)
  assert first > 0
  # Other params values (another seed) and another num_steps: no new trace.
  r = nio_jax.nio(loss_fn, tm.mlp_params(jax.random.key(7)), batches, {**cfg, "num_steps": 2})
  assert len(traces) == first, "nio() recompiled its step for the same shapes and settings"
  assert len(r.history["gc"]) == 2
  # A different step setting (gamma) is a different compiled step.
  nio_jax.nio(loss_fn, tm.mlp_params(KEY), batches, {**cfg, "gamma": 3.0})
  assert len(traces) > first
