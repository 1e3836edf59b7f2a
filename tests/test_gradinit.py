"""GradInit checked against a direct JAX computation and a PyTorch re-implementation of the
released code's step (scale gradient = <∂L/∂p, p>·‖p0‖/‖p‖, RescaleAdam by hand)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nio_jax import init_scales
from nio_jax.methods import GRADINIT_RECIPES, GradInitConfig, gradinit, gradinit_adam
from nio_jax.methods.gradinit import lookahead_batches, make_gradinit_step
from tests import tiny_models as tm

SIZES = (5, 8, 3)
NAMES = [("dense0", "kernel"), ("dense0", "bias"), ("dense1", "kernel"), ("dense1", "bias")]
SCALES = (1.3, 0.8, 0.6, 1.1)  # non-trivial starting scales


@pytest.fixture(scope="module")
def setup():
  params = tm.mlp_params(jax.random.PRNGKey(1), SIZES)
  batch = tm.mlp_batch(jax.random.PRNGKey(2), b=8, d=SIZES[0], c=SIZES[-1])
  nxt = tm.mlp_batch(jax.random.PRNGKey(3), b=8, d=SIZES[0], c=SIZES[-1])
  scales, spec = init_scales(params)
  scales = {
    l: {k: jnp.float32(SCALES[i]) for i, (ll, k) in enumerate(NAMES) if ll == l}
    for l in ("dense0", "dense1")
  }
  return params, batch, nxt, scales, spec


def mean_loss(params, batch):
  return jnp.mean(tm.mlp_loss(params, batch))


def scaled(params, s):
  return jax.tree_util.tree_map(lambda p, a: a * p, params, s)


# ---------------------------------------------------------------- direct JAX computation


@functools.partial(jax.jit, static_argnames=("variant", "eta", "branch"))
def direct_grad(params, s, batch, nxt, variant, eta, branch):
  h = batch["x"].shape[0] // 2
  st = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[:h], b[:h]]), batch, nxt)

  def g_of(s):
    return jax.grad(mean_loss)(scaled(params, s), batch)

  def gn_of(s):
    g = jax.tree_util.tree_leaves(g_of(s))
    if variant == "adam":
      return sum(jnp.abs(x).sum() for x in g)
    return jnp.sqrt(sum((x**2).sum() for x in g))

  def obj_of(s):
    g = g_of(s)
    gn = gn_of(s)
    d = jax.tree_util.tree_map(lambda x: jnp.sign(x) if variant == "adam" else x / gn, g)
    d = jax.lax.stop_gradient(d)
    stepped = jax.tree_util.tree_map(lambda p, dd: p - eta * dd, scaled(params, s), d)
    return mean_loss(stepped, st) / eta

  return jax.grad(gn_of if branch == "constraint" else obj_of)(s)


# ---------------------------------------------------------------- PyTorch (released code)


def torch_loss(ps, x, y):
  w0, b0, w1, b1 = ps
  logits = torch.tanh(x @ w0 + b0) @ w1 + b1
  return torch.nn.functional.cross_entropy(logits, y)


def torch_scale_grads(params, s, batch, nxt, variant, eta, branch):
  """The released `gradinit` step with p = s·p0 as leaf tensors (float64)."""
  p0 = [np.asarray(params[l][k], np.float64) for l, k in NAMES]
  ps = [torch.tensor(float(s[l][k]) * a, requires_grad=True) for (l, k), a in zip(NAMES, p0)]
  x0, y0 = (
    torch.tensor(np.asarray(batch["x"], np.float64)),
    torch.tensor(np.asarray(batch["y"], np.int64)),
  )
  x2, y2 = (
    torch.tensor(np.asarray(nxt["x"], np.float64)),
    torch.tensor(np.asarray(nxt["y"], np.int64)),
  )
  h = x0.shape[0] // 2
  init_loss = torch_loss(ps, x0, y0)  # S = B0 ∪ B1
  grads = torch.autograd.grad(init_loss, ps, create_graph=True)
  if variant == "adam":
    gnorm = sum(g.abs().sum() for g in grads)
    dirs = [g.sign() for g in grads]
  else:
    gnorm = sum(g.square().sum() for g in grads).sqrt()
    dirs = [g / gnorm for g in grads]
  if branch == "constraint":
    gnorm.backward()
    value = None
  else:
    opt = [p - eta * d.detach() for p, d in zip(ps, dirs)]
    upd_x, upd_y = torch.cat([x0[:h], x2[:h]]), torch.cat([y0[:h], y2[:h]])  # B0 ∪ B2
    obj = torch_loss(opt, upd_x, upd_y) / eta
    obj.backward()
    value = obj.item()
  out = [
    torch.sum(p.grad * p).item() * np.linalg.norm(a) / p.detach().norm().item()
    for p, a in zip(ps, p0)
  ]
  return np.array(out), gnorm.item(), value


class HandRescaleAdam:
  """The released `RescaleAdam.step` for one scalar scale per tensor."""

  def __init__(self, alphas, lr, min_scales, clip=1.0, b1=0.9, b2=0.999, eps=1e-8):
    self.alpha, self.lr, self.lo = list(alphas), lr, list(min_scales)
    self.clip, self.b1, self.b2, self.eps = clip, b1, b2, eps
    n = len(alphas)
    self.step_, self.cons_step = 0, 0
    self.exp_avg, self.cons_exp_avg, self.exp_avg_sq = [0.0] * n, [0.0] * n, [0.0] * n

  def step(self, grads, is_constraint):
    if is_constraint:
      self.cons_step += 1
    else:
      self.step_ += 1
    for i, g in enumerate(grads):
      g = max(min(g, self.clip), -self.clip)
      if is_constraint:
        self.cons_exp_avg[i] = self.cons_exp_avg[i] * self.b1 + g * (1 - self.b1)
        steps, m = self.cons_step, self.cons_exp_avg[i]
      else:
        self.exp_avg[i] = self.exp_avg[i] * self.b1 + g * (1 - self.b1)
        steps, m = self.step_, self.exp_avg[i]
      self.exp_avg_sq[i] = self.exp_avg_sq[i] * self.b2 + g * g * (1 - self.b2)
      bc1 = 1 - self.b1**steps
      bc2 = 1 - self.b2 ** (self.cons_step + self.step_)
      denom = math.sqrt(self.exp_avg_sq[i] / bc2) + self.eps
      self.alpha[i] = max(self.alpha[i] - self.lr / bc1 * m / denom, self.lo[i])
    return list(self.alpha)


def flat(s):
  return np.array([float(s[l][k]) for l, k in NAMES])


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_step_matches_direct_jax_and_torch(setup, variant):
  """A constraint step then an objective step (one shared optimiser state) equal RescaleAdam
  by hand fed with the scale gradients of (a) a direct JAX computation, (b) PyTorch."""
  params, batch, nxt, s0, spec = setup
  eta, lr = 0.1, 0.05
  constraint = make_gradinit_step(
    tm.mlp_loss, spec, dict(variant=variant, eta=eta, gamma=1e-6, lr=lr, batch_size=None)
  )
  step_c, init = constraint.step, constraint.init
  step_o = make_gradinit_step(
    tm.mlp_loss, spec, dict(variant=variant, eta=eta, gamma=1e6, lr=lr, batch_size=None)
  ).step
  lo = [0.01, 0.0, 0.01, 0.0]
  hand_t, hand_j = HandRescaleAdam(flat(s0), lr, lo), HandRescaleAdam(flat(s0), lr, lo)

  s1, state, m1 = step_c(params, s0, init(s0), batch, nxt)
  g_t, gn_t, _ = torch_scale_grads(params, s0, batch, nxt, variant, eta, "constraint")
  g_j = flat(direct_grad(params, s0, batch, nxt, variant, eta, "constraint"))
  np.testing.assert_allclose(g_j, g_t, rtol=2e-4, atol=1e-6)
  assert bool(m1["constraint"])
  np.testing.assert_allclose(float(m1["grad_norm"]), gn_t, rtol=1e-5)
  np.testing.assert_allclose(flat(s1), hand_t.step(list(g_t), True), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(s1), hand_j.step(list(g_j), True), rtol=1e-5, atol=1e-6)

  s2, state, m2 = step_o(params, s1, state, batch, nxt)
  g_t, gn_t, obj_t = torch_scale_grads(params, s1, batch, nxt, variant, eta, "objective")
  g_j = flat(direct_grad(params, s1, batch, nxt, variant, eta, "objective"))
  np.testing.assert_allclose(g_j, g_t, rtol=2e-4, atol=1e-6)
  assert not bool(m2["constraint"])
  np.testing.assert_allclose(float(m2["grad_norm"]), gn_t, rtol=1e-5)
  np.testing.assert_allclose(float(m2["objective"]), obj_t, rtol=1e-5)
  np.testing.assert_allclose(flat(s2), hand_t.step(list(g_t), False), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(s2), hand_j.step(list(g_j), False), rtol=1e-5, atol=1e-6)


def test_scale_grad_is_what_the_step_uses(setup):
  """`scale_grad` (exposed for tests/debugging) equals the direct JAX gradient."""
  params, batch, nxt, s0, spec = setup
  scale_grad = make_gradinit_step(tm.mlp_loss, spec, dict(gamma=1e6, batch_size=None)).grad_fn
  st = lookahead_batches(batch, nxt, "half")[1]
  g, m = jax.jit(scale_grad)(params, s0, batch, st)
  np.testing.assert_allclose(
    flat(g),
    flat(direct_grad(params, s0, batch, nxt, "sgd", 0.1, "objective")),
    rtol=1e-4,
    atol=1e-6,
  )


def test_adam_norm_and_direction(setup):
  from nio_jax.methods.gradinit import gradient_norm_and_direction

  params, batch, *_ = setup
  g = jax.grad(mean_loss)(params, batch)
  gn, d = gradient_norm_and_direction(g, "adam")
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(g)]
  np.testing.assert_allclose(float(gn), sum(np.abs(x).sum() for x in leaves), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(d), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.sign(b))
  gn2, d2 = gradient_norm_and_direction(g, "sgd")
  np.testing.assert_allclose(float(gn2), math.sqrt(sum((x**2).sum() for x in leaves)), rtol=1e-6)
  np.testing.assert_allclose(
    float(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(d2))), 1.0, rtol=1e-5
  )


def test_lookahead_batches():
  a = {"x": jnp.arange(6)}
  b = {"x": jnp.arange(10, 16)}
  s, t = lookahead_batches(a, b, "half")
  np.testing.assert_array_equal(s["x"], np.arange(6))
  np.testing.assert_array_equal(t["x"], [0, 1, 2, 10, 11, 12])  # B0 ∪ B2
  s, t = lookahead_batches(a, b, "disjoint")
  np.testing.assert_array_equal(t["x"], np.arange(10, 16))
  s, t = lookahead_batches({"x": jnp.arange(7)}, None, "thirds")  # n = 2
  np.testing.assert_array_equal(s["x"], [0, 1, 2, 3])
  np.testing.assert_array_equal(t["x"], [2, 3, 4, 5, 6])


def test_recipes_match_algorithms_md():
  r = GRADINIT_RECIPES
  want = {
    "vgg19": (1e-2, 390, 128),
    "vgg19_bn": (1e-1, 390, 128),
    "resnet110": (5e-2, 390, 128),
    "resnet110_bn": (1e-3, 390, 128),
    "densenet100": (5e-3, 780, 64),
    "densenet100_bn": (1e-2, 780, 64),
    "wrn28_10": (3e-3, 780, 64),
  }
  for name, (lr, steps, bs) in want.items():
    cfg = GradInitConfig.create(name)
    assert (cfg.lr, cfg.num_steps, cfg.batch_size, cfg.eta, cfg.gamma, cfg.variant) == (
      lr,
      steps,
      bs,
      0.1,
      1.0,
      "sgd",
    ), name
    assert cfg.normalize_grad and cfg.min_scale == 0.01 and cfg.grad_clip == 1.0
  t = GradInitConfig.create("transformer")
  assert (t.variant, t.eta, t.gamma, t.lr, t.b2, t.num_steps, t.layernorm_max_scale) == (
    "adam",
    1e-3,
    1000.0,
    2.5e-3,
    0.98,
    780,
    100.0,
  )
  assert set(r) == set(want) | {"transformer"}


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=-1.0), "gamma"),
    (dict(eta=0.0), "eta"),
    (dict(eta=-0.1), "eta"),
    (dict(num_steps=0), "num_steps"),
    (dict(lr=0.0), "lr"),
    (dict(variant="rmsprop"), "variant"),
    (dict(lookahead="quarter"), "lookahead"),
    (dict(b2=1.0), "betas"),
    (dict(gama=1.0), "unknown GradInit config key"),
  ],
)
def test_bad_config(bad, match):
  with pytest.raises(ValueError, match=match):
    GradInitConfig.create(bad)


def test_bad_input(setup):
  params, batch, *_ = setup
  with pytest.raises(ValueError, match="unknown GradInit recipe"):
    GradInitConfig.create("resnet50")
  odd = tm.mlp_batch(jax.random.PRNGKey(0), b=7, d=SIZES[0], c=SIZES[-1])
  with pytest.raises(ValueError, match="odd"):
    gradinit(tm.mlp_loss, params, [odd], dict(num_steps=1, batch_size=None))
  with pytest.raises(TypeError, match="not a single batch"):
    gradinit(tm.mlp_loss, params, batch, dict(num_steps=1, batch_size=None))
  with pytest.raises(ValueError, match="ran out"):  # 2 batches per step
    gradinit(tm.mlp_loss, params, iter([batch]), dict(num_steps=1, batch_size=None))
  with pytest.raises(ValueError, match="variant='sgd'"):
    gradinit_adam(tm.mlp_loss, params, [batch], dict(variant="sgd"))
  with pytest.raises(ValueError, match="per-example losses"):
    gradinit(
      lambda p, b: jnp.mean(tm.mlp_loss(p, b)), params, [batch], dict(num_steps=1, batch_size=None)
    )
  with (
    pytest.warns(UserWarning, match="expects batches of 128"),
    pytest.raises(ValueError, match="ran out"),
  ):  # warns before running
    gradinit(tm.mlp_loss, params, iter([batch]), dict(num_steps=1, gamma=1e6))


def test_layernorm_cap():
  """The IWSLT recipe's layer-norm scale cap, on the optimiser the step uses."""
  key = jax.random.PRNGKey(4)
  params = {
    "dense0": tm.mlp_params(key, (5, 3))["dense0"],
    "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
  }

  def loss(p, b):
    h = b["x"] @ p["dense0"]["kernel"] + p["dense0"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5)
    return tm.xent(h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"], b["y"])

  cfg = dict(GRADINIT_RECIPES["transformer"], layernorm_max_scale=1.2, lr=0.5)
  assert GradInitConfig.create(cfg).batches_per_step == 1  # thirds: one batch per step
  # The cap, on the optimiser itself: a gradient pushing every scale up by lr.
  scales, spec = init_scales(params)
  tx = make_gradinit_step(loss, spec, cfg).tx
  up = jax.tree_util.tree_map(lambda s: -jnp.ones_like(s), scales)
  upd, _ = tx.update(up, tx.init(scales), scales, is_constraint=False)
  new = jax.tree_util.tree_map(lambda s, u: s + u, scales, upd)
  np.testing.assert_allclose(float(new["LayerNorm_0"]["scale"]), 1.2, rtol=1e-6)
  np.testing.assert_allclose(float(new["dense0"]["kernel"]), 1.5, rtol=1e-5)
