"""The NIO, GradInit and MetaInit (RescaleAdam variant) searches against an independent
computation written from ../shared/ALGORITHMS.md, over several steps, comparing VALUES.

Nothing here calls the library's step, GradCosine, sub-batch slicing, norms, gradient
quotient or optimiser: the reference recomputes each from its definition (explicit cosine
matrix, explicit Hessian, Adam written out in numpy on plain floats). The batches and γ are
chosen so that both branches (constraint step and objective step) run, which the tests
assert, so a wrong formula in either branch, in the γ comparison, in the norm terms or in the
optimiser changes the compared values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import nio_jax
from nio_jax.methods import gradinit, metainit
from tests import tiny_models as tm
from tests.reference import RefRescaleAdam

SIZES = (4, 6, 3)
STEPS = 6
PARAMS = tm.mlp_params(jax.random.PRNGKey(11), SIZES, bias=0.3)
LEAVES = [("dense0", "bias"), ("dense0", "kernel"), ("dense1", "bias"), ("dense1", "kernel")]


def batches(n, b, seed=20):
  out = []
  for i in range(n):
    bt = tm.mlp_batch(jax.random.PRNGKey(seed + i), b=b, d=SIZES[0], c=SIZES[-1])
    out.append({"x": bt["x"] * (0.5 + i), "y": bt["y"]})  # spread of gradient norms
  return out


def scaled(s):
  """θ = s · θ0, written out per leaf (no apply_scales)."""
  return {
    m: {k: s[(m, k)] * PARAMS[m][k] for k in ("kernel", "bias")} for m in ("dense0", "dense1")
  }


def mean_loss(params, batch):
  return jnp.mean(tm.mlp_loss(params, batch))


def lib_scales(res):
  return {k: float(res.scales[k[0]][k[1]]) for k in LEAVES}


def assert_scales_close(got, want, rtol=2e-4):
  for k in LEAVES:
    assert got[k] == pytest.approx(want[k], rel=rtol, abs=1e-6), k


# ------------------------------------------------------------------------------------ NIO


def ref_bounds(b, d, r):
  length = int(b / d)
  out = []
  for i in range(d):
    a = 0 if i == 0 else int((1 - r) * length * i)
    e = b if i == d - 1 else int((1 + r) * length * (i + 1))
    out.append((a, e))
  return out


def ref_nio_terms(s, batch, d, r):
  """(GC, [‖g_i‖]) from explicit sub-batch gradients and the explicit D×D cosine matrix."""
  b = batch["y"].shape[0]
  rows = []
  for a, e in ref_bounds(b, d, r):
    sub = {k: v[a:e] for k, v in batch.items()}
    rows.append(ravel_pytree(jax.grad(mean_loss)(scaled(s), sub))[0])
  g = jnp.stack(rows)
  n = jnp.sqrt(jnp.sum(g * g, axis=1))
  cos = (g @ g.T) / (n[:, None] * n[None, :])
  gc = (jnp.sum(cos) - jnp.sum(jnp.diag(cos))) / (d * (d - 1))
  return gc, n


def ref_nio(batch_list, steps, *, d, r, gamma, lr, objective, mu=1.0):
  opt = RefRescaleAdam(LEAVES, lr)
  s = {k: 1.0 for k in LEAVES}
  hist = []
  for t in range(steps):
    batch = batch_list[t % len(batch_list)]
    gc, n = ref_nio_terms(s, batch, d, r)
    gn = float(np.mean(np.asarray(n)))
    constraint = gn > gamma

    def search_loss(sv, batch=batch, constraint=constraint):
      gc, n = ref_nio_terms(sv, batch, d, r)
      if constraint:
        return jnp.mean(n)
      if objective == "gc":
        return -gc
      if objective == "gc_gn":
        return -gc - mu * jnp.sum(n**2)
      return -gc - mu * jnp.sum(n)

    grads = jax.grad(search_loss)({k: jnp.float32(v) for k, v in s.items()})
    hist.append((float(gc), gn, constraint))
    s = opt.step(s, grads, constraint)
  return s, hist


def nio_gamma(batch_list, d, r):
  """A γ between the initial mean gradient norms of the batches: both branches run."""
  gns = [
    float(np.mean(np.asarray(ref_nio_terms(dict.fromkeys(LEAVES, 1.0), b, d, r)[1])))
    for b in batch_list
  ]
  lo, hi = min(gns), max(gns)
  assert hi > 1.2 * lo, gns
  return 0.5 * (lo + hi)


@pytest.mark.parametrize(
  "objective,d,r,gn_mul",
  [("gc", 4, 0.2, 1.0), ("gc_gn", 3, 0.25, 0.5), ("gc_gn_sqrt", 4, 0.2, 1.0)],
)
def test_nio_search_equals_reference(objective, d, r, gn_mul):
  bl = batches(3, b=12)
  gamma = nio_gamma(bl, d, r)
  cfg = nio_jax.NIOConfig(
    num_steps=STEPS,
    num_chunks=d,
    overlap=r,
    gamma=gamma,
    lr=0.05,
    objective=objective,
    gn_mul=gn_mul,
    grad_filter=None,
  )
  res = nio_jax.nio(tm.mlp_loss, PARAMS, bl, cfg)
  want, hist = ref_nio(bl, STEPS, d=d, r=r, gamma=gamma, lr=0.05, objective=objective, mu=gn_mul)
  kinds = [h[2] for h in hist]
  assert any(kinds) and not all(kinds), kinds  # both branches ran
  np.testing.assert_array_equal(np.asarray(res.history["constraint"]), kinds)
  np.testing.assert_allclose(res.history["gc"], [h[0] for h in hist], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(res.history["grad_norm"], [h[1] for h in hist], rtol=1e-4)
  assert_scales_close(lib_scales(res), want)


def test_nio_samplewise_equals_reference():
  """Sample-wise GC is the batch setting with D = B, r = 0 (ALGORITHMS.md)."""
  bl = batches(3, b=6)
  gamma = nio_gamma(bl, 6, 0.0)
  cfg = dict(num_steps=4, num_chunks=None, overlap=0.0, gamma=gamma, lr=0.05, grad_filter=None)
  res = nio_jax.nio(tm.mlp_loss, PARAMS, bl, cfg)
  want, hist = ref_nio(bl, 4, d=6, r=0.0, gamma=gamma, lr=0.05, objective="gc_gn_sqrt")
  np.testing.assert_array_equal(np.asarray(res.history["constraint"]), [h[2] for h in hist])
  np.testing.assert_allclose(res.history["gc"], [h[0] for h in hist], rtol=1e-4, atol=1e-6)
  assert_scales_close(lib_scales(res), want)


# ------------------------------------------------------------------------------- GradInit


def ref_gradinit(batch_list, steps, *, variant, eta, gamma, lr):
  opt = RefRescaleAdam(LEAVES, lr)
  s = {k: 1.0 for k in LEAVES}
  hist = []
  for t in range(steps):
    big = batch_list[(2 * t) % len(batch_list)]
    nxt = batch_list[(2 * t + 1) % len(batch_list)]
    h = big["y"].shape[0] // 2
    s_tilde = {k: jnp.concatenate([big[k][:h], nxt[k][:h]]) for k in big}  # B0 ∪ B2

    def gn_dir(sv, big=big):
      g = ravel_pytree(jax.grad(mean_loss)(scaled(sv), big))[0]
      if variant == "adam":
        return jnp.sum(jnp.abs(g)), jnp.sign(g)
      gn = jnp.sqrt(jnp.sum(g * g))
      return gn, g / gn

    def lookahead(sv, direction, s_tilde=s_tilde):
      flat, unravel = ravel_pytree(scaled(sv))
      return mean_loss(unravel(flat - eta * direction), s_tilde) / eta

    sj = {k: jnp.float32(v) for k, v in s.items()}
    gn, direction = gn_dir(sj)
    constraint = float(gn) > gamma
    if constraint:
      grads = jax.grad(lambda sv: gn_dir(sv)[0])(sj)
    else:
      grads = jax.grad(lookahead)(sj, jax.lax.stop_gradient(direction))
    hist.append((float(gn), float(lookahead(sj, direction)), constraint))
    s = opt.step(s, grads, constraint)
  return s, hist


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_gradinit_search_equals_reference(variant):
  bl = batches(4, b=8)
  gns = []
  for b in bl:
    g = ravel_pytree(jax.grad(mean_loss)(PARAMS, b))[0]
    gns.append(float(jnp.sum(jnp.abs(g)) if variant == "adam" else jnp.linalg.norm(g)))
  gamma = 0.5 * (gns[0] + gns[2])  # S batches alternate bl[0], bl[2]: one above γ, one below
  eta = 0.1 if variant == "sgd" else 1e-2
  cfg = dict(variant=variant, num_steps=STEPS, eta=eta, gamma=gamma, lr=0.05, batch_size=None)
  res = gradinit(tm.mlp_loss, PARAMS, bl, cfg)
  want, hist = ref_gradinit(bl, STEPS, variant=variant, eta=eta, gamma=gamma, lr=0.05)
  kinds = [h[2] for h in hist]
  assert any(kinds) and not all(kinds), kinds
  np.testing.assert_array_equal(np.asarray(res.history["constraint"]), kinds)
  np.testing.assert_allclose(res.history["grad_norm"], [h[0] for h in hist], rtol=1e-4)
  np.testing.assert_allclose(res.history["objective"], [h[1] for h in hist], rtol=1e-4)
  assert_scales_close(lib_scales(res), want)


# ------------------------------------------------------------------------------- MetaInit


def ref_gq(s, batch, eps=1e-5):
  """GQ from the explicit Hessian of the flattened params (ALGORITHMS.md, "MetaInit")."""
  flat, unravel = ravel_pytree(scaled(s))
  f = lambda v: mean_loss(unravel(v), batch)
  g = jax.grad(f)(flat)
  hg = jax.hessian(f)(flat) @ g
  sign = jax.lax.stop_gradient(jnp.where(g >= 0, 1.0, -1.0))
  return jnp.sum(jnp.abs((g - hg) / (g + eps * sign) - 1.0)) / flat.size


def test_metainit_rescale_adam_equals_reference():
  bl = batches(3, b=6)
  lr = 0.02
  res = metainit(tm.mlp_loss, PARAMS, bl, dict(num_steps=STEPS, variant="rescale_adam", lr=lr))
  opt = RefRescaleAdam(LEAVES, lr)
  s = {k: 1.0 for k in LEAVES}
  gqs = []
  for t in range(STEPS):
    sj = {k: jnp.float32(v) for k, v in s.items()}
    gq, grads = jax.value_and_grad(ref_gq)(sj, bl[t % 3])
    gqs.append(float(gq))
    s = opt.step(s, grads, False)
  np.testing.assert_allclose(res.history["gq"], gqs, rtol=1e-4)
  assert_scales_close(lib_scales(res), s)
  # The scales moved by more than one step's worth: not a comparison of two "unchanged".
  assert max(abs(v - 1.0) for v in s.values()) > lr
