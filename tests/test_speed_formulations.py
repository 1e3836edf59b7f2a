"""Every speed formulation (`impl`) computes the same numbers as the plain definitions.

Reference values: a Python loop of `jax.grad` per example (sample-wise), a Python loop of
`jax.grad` of each sub-batch mean through the same loss (batch setting), and the brute-force
D×D cosine matrix; all in float64 on a tiny conv net with a scanned stage, strided and padded
convolutions (the cases the conv rewrite must get right).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nio_jax import cosine, per_example


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))(x)
    return nn.relu(y) + x, None


class TinyNet(nn.Module):
  bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()(x)
    x = nn.Conv(3, (2, 2), padding="VALID", kernel_dilation=(2, 1))(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3)(x)


def _setup(bn=False, b=6):
  model = TinyNet(bn=bn)
  x = jax.random.normal(jax.random.key(1), (b, 7, 7, 2), jnp.float64)
  y = jnp.arange(b) % 3
  variables = model.init(jax.random.key(0), x)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables["params"])

  def loss_fn(p, batch):
    if bn:
      stats = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables["batch_stats"])
      logits, _ = model.apply(
        {"params": p, "batch_stats": stats}, batch["x"], mutable=["batch_stats"]
      )
    else:
      logits = model.apply({"params": p}, batch["x"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]

  return loss_fn, params, {"x": x, "y": y}


def _flat(tree):
  return np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("mode", per_example.CONV_MODES)
def test_rewrite_convs_same_values_and_grads(mode):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup()
    rw = per_example.rewrite_convs(loss_fn, mode)
    np.testing.assert_allclose(rw(params, batch), loss_fn(params, batch), rtol=1e-12)
    g0 = jax.grad(lambda p: loss_fn(p, batch).sum())(params)
    g1 = jax.grad(lambda p: rw(p, batch).sum())(params)
    np.testing.assert_allclose(_flat(g1), _flat(g0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", per_example.SAMPLE_IMPLS)
def test_sample_impls_equal_loop_of_grads(impl):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup()
    ref = [
      jax.grad(lambda p, i=i: loss_fn(p, jax.tree_util.tree_map(lambda a: a[i : i + 1], batch))[0])(
        params
      )
      for i in range(6)
    ]
    _, got = per_example.sample_grads_selected(loss_fn, params, batch, impl=impl)
    for i in range(6):
      np.testing.assert_allclose(_flat([g[i] for g in got]), _flat(ref[i]), rtol=1e-9, atol=1e-12)
    gc_ref = cosine.gc_brute_force(jax.tree_util.tree_map(lambda *g: jnp.stack(g), *ref))
    st = cosine.gradcosine(loss_fn, params, batch, impl=impl)
    np.testing.assert_allclose(st.gc, gc_ref, rtol=1e-9)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("impl", per_example.SUBBATCH_IMPLS)
def test_subbatch_impls_equal_loop_of_grads(impl, bn):
  if impl.startswith("segments") and bn:
    pytest.skip("segments is documented as exact only without cross-example coupling")
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(bn=bn, b=10)
    bounds = per_example.subbatch_bounds(10, 3, 0.2)
    ref = [jax.grad(lambda p, a=a, e=e: loss_fn(p, batch)[a:e].mean())(params) for a, e in bounds]
    _, got = per_example.subbatch_grads_selected(loss_fn, params, batch, 3, 0.2, impl=impl)
    for i in range(3):
      np.testing.assert_allclose(_flat([g[i] for g in got]), _flat(ref[i]), rtol=1e-9, atol=1e-12)
    gc_ref = cosine.gc_brute_force(jax.tree_util.tree_map(lambda *g: jnp.stack(g), *ref))
    st = cosine.gradcosine(loss_fn, params, batch, num_chunks=3, overlap=0.2, impl=impl)
    np.testing.assert_allclose(st.gc, gc_ref, rtol=1e-9)


@pytest.mark.parametrize(
  "setting,impls", [(None, ("vmap", "im2col", "slices")), (3, ("loop", "segments", "loop_im2col"))]
)
def test_second_order_same_across_impls(setting, impls):
  """The NIO step differentiates GC w.r.t. the params: same gradient for every impl."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(b=10)
    ov = 0.0 if setting is None else 0.2

    def grad_gc(impl):
      return _flat(
        jax.grad(
          lambda p: (
            cosine.gradcosine_stats(loss_fn, p, batch, num_chunks=setting, overlap=ov, impl=impl).gc
          )
        )(params)
      )

    ref = grad_gc(impls[0])
    for impl in impls[1:]:
      np.testing.assert_allclose(grad_gc(impl), ref, rtol=1e-8, atol=1e-12)


def test_segment_bounds_cover_batch():
  for b, d, r in [(64, 4, 0.2), (32, 4, 0.2), (10, 3, 0.0), (7, 2, 0.5)]:
    segs = per_example.segment_bounds(b, d, r)
    assert segs[0][0] == 0 and segs[-1][1] == b
    assert all(s[1] == t[0] for s, t in zip(segs[:-1], segs[1:]))


def test_default_impl_is_valid_for_every_backend():
  for backend in ("cpu", "gpu", "tpu", None):
    assert cosine.default_impl(None, backend=backend) in per_example.SAMPLE_IMPLS
    assert cosine.default_impl(4, backend=backend) in per_example.SUBBATCH_IMPLS
    assert not cosine.default_impl(4, backend=backend).startswith("segments")  # BN-unsafe


def test_im2col_memory_guard_keeps_values(monkeypatch):
  """Above IM2COL_MAX_BYTES: batch setting falls back to plain convs, sample-wise chunks."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(b=6)
    need = per_example.im2col_bytes(loss_fn, params, batch)
    assert need > 0
    ref_s = cosine.gradcosine(loss_fn, params, batch, impl="vmap").gc
    ref_b = cosine.gradcosine(loss_fn, params, batch, num_chunks=3, overlap=0.2, impl="loop").gc
    monkeypatch.setattr(per_example, "IM2COL_MAX_BYTES", need // 3)
    got_s = cosine.gradcosine_stats(loss_fn, params, batch, impl="im2col").gc
    got_b = cosine.gradcosine_stats(
      loss_fn, params, batch, num_chunks=3, overlap=0.2, impl="loop_im2col"
    ).gc
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-9)
    np.testing.assert_allclose(got_b, ref_b, rtol=1e-9)
