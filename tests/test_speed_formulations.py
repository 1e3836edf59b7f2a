"""Every formulation (`pullback` x `conv`) computes the same numbers as the plain definitions.

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

import nio_jax
from nio_jax import cosine, formulation, jaxpr_rewrites, per_example


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


@pytest.mark.parametrize("mode", jaxpr_rewrites.CONV_MODES)
def test_rewrite_convs_same_values_and_grads(mode):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup()
    rw = jaxpr_rewrites.rewrite_convs(loss_fn, mode)
    np.testing.assert_allclose(rw(params, batch), loss_fn(params, batch), rtol=1e-12)
    g0 = jax.grad(lambda p: loss_fn(p, batch).sum())(params)
    g1 = jax.grad(lambda p: rw(p, batch).sum())(params)
    np.testing.assert_allclose(_flat(g1), _flat(g0), rtol=1e-10, atol=1e-12)


def _loop_sample_grads(loss_fn, params, batch, b):
  return [
    jax.grad(lambda p, i=i: loss_fn(p, jax.tree_util.tree_map(lambda a: a[i : i + 1], batch))[0])(
      params
    )
    for i in range(b)
  ]


def _sample_grads(loss_fn, params, batch, pullback, conv):
  form = formulation.resolve_formulation(loss_fn, params, batch, None, pullback, conv)
  return per_example.sample_grads_selected(loss_fn, params, batch, form)[1]


def _subbatch_grads(loss_fn, params, batch, d, r, pullback, conv):
  form = formulation.resolve_formulation(loss_fn, params, batch, d, pullback, conv)
  return per_example.subbatch_grads_selected(loss_fn, params, batch, d, r, form)[1]


def _assert_rows_equal(got, ref):
  for i, r in enumerate(ref):
    np.testing.assert_allclose(_flat([g[i] for g in got]), _flat(r), rtol=1e-9, atol=1e-12)


def _cases(pullbacks, keep):
  """(pullback, conv) pairs; the `slices` conv mode (a default nowhere) is slow except with
  the pullbacks in `keep`: CI runs them all (NIO_JAX_SLOW=1)."""
  return [
    pytest.param(pb, cv, marks=pytest.mark.slow) if cv == "slices" and pb not in keep else (pb, cv)
    for pb in pullbacks
    for cv in formulation.CONVS
  ]


@pytest.mark.parametrize("pullback,conv", _cases(formulation.GRAD_PULLBACKS, ("vmap",)))
def test_sample_formulations_equal_loop_of_grads(pullback, conv):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup()
    ref = _loop_sample_grads(loss_fn, params, batch, 6)
    got = _sample_grads(loss_fn, params, batch, pullback, conv)
    _assert_rows_equal(got, ref)
    gc_ref = cosine.gc_brute_force(jax.tree_util.tree_map(lambda *g: jnp.stack(g), *ref))
    st = cosine.gradcosine(loss_fn, params, batch, pullback=pullback, conv=conv)
    np.testing.assert_allclose(st.gc, gc_ref, rtol=1e-9)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("pullback,conv", _cases(formulation.SUBBATCH_PULLBACKS, ("loop", "sites")))
def test_subbatch_formulations_equal_loop_of_grads(pullback, conv, bn):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(bn=bn, b=10)
    if pullback in ("segments", "sites") and bn:  # not exact with batch norm: refused, named
      with pytest.raises(ValueError, match=f"pullback='{pullback}' is exact only .*batch norm"):
        cosine.gradcosine(loss_fn, params, batch, num_chunks=3, overlap=0.2, pullback=pullback)
      return
    if pullback == "sites" and conv == "slices":  # the kernel is sliced: not one operation
      with pytest.raises(ValueError, match="pullback='sites' cannot use .*used by `slice`"):
        _subbatch_grads(loss_fn, params, batch, 3, 0.2, pullback, conv)
      return
    bounds = per_example.subbatch_bounds(10, 3, 0.2)
    ref = [jax.grad(lambda p, a=a, e=e: loss_fn(p, batch)[a:e].mean())(params) for a, e in bounds]
    got = _subbatch_grads(loss_fn, params, batch, 3, 0.2, pullback, conv)
    _assert_rows_equal(got, ref)
    gc_ref = cosine.gc_brute_force(jax.tree_util.tree_map(lambda *g: jnp.stack(g), *ref))
    st = cosine.gradcosine(
      loss_fn, params, batch, num_chunks=3, overlap=0.2, pullback=pullback, conv=conv
    )
    np.testing.assert_allclose(st.gc, gc_ref, rtol=1e-9)


@pytest.mark.parametrize(
  "setting,forms",
  [
    pytest.param(
      None,
      (("vmap", "none"), ("vmap", "im2col"), ("vjp", "slices"), ("map", "im2col")),
      marks=pytest.mark.slow,  # 46 s; the sample-wise second order is also in test_per_example_norms
    ),
    (
      3,
      (
        ("loop", "none"),
        ("segments", "im2col"),
        ("sites", "im2col"),
        ("loop", "im2col"),
        ("scan", "slices"),
      ),
    ),
  ],
)
def test_second_order_same_across_formulations(setting, forms):
  """The NIO step differentiates GC w.r.t. the params: same gradient for every formulation."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(b=10)
    ov = 0.0 if setting is None else 0.2

    def grad_gc(pullback, conv):
      return _flat(
        jax.grad(
          lambda p: (
            cosine.gradcosine_stats(
              loss_fn, p, batch, num_chunks=setting, overlap=ov, pullback=pullback, conv=conv
            ).gc
          )
        )(params)
      )

    ref = grad_gc(*forms[0])
    for form in forms[1:]:
      np.testing.assert_allclose(grad_gc(*form), ref, rtol=1e-8, atol=1e-12)


def test_segment_bounds_cover_batch():
  for b, d, r in [(64, 4, 0.2), (32, 4, 0.2), (10, 3, 0.0), (7, 2, 0.5)]:
    segs = per_example.segment_bounds(b, d, r)
    assert segs[0][0] == 0 and segs[-1][1] == b
    assert all(s[1] == t[0] for s, t in zip(segs[:-1], segs[1:]))


def test_default_formulation_per_backend_as_documented():
  """docs/performance.md: im2col on CPU, plain convs elsewhere. (The batch setting's "auto"
  pullback also depends on the loss: `test_auto_batch_pullback_is_segments_only_where_exact`.)"""
  assert formulation.default_formulation(None, backend="cpu") == ("vmap", "im2col")
  assert formulation.default_formulation(4, backend="cpu") == ("loop", "im2col")
  for backend in ("gpu", "tpu"):
    assert formulation.default_formulation(None, backend=backend) == ("vmap", "none")
    assert formulation.default_formulation(4, backend=backend) == ("loop", "none")
  here = jax.default_backend()
  loss_fn, params, batch = _setup(bn=True, b=8)  # batch norm: "auto" is the default pullback
  for d in (None, 4):
    want = formulation.default_formulation(d, backend=here)
    resolve = lambda pb, cv, d=d: formulation.resolve_formulation(loss_fn, params, batch, d, pb, cv)
    assert resolve("auto", "auto")[:2] == want
    # "auto" for one option keeps the other as given
    assert resolve("scan", "auto")[:2] == ("scan", want[1])
    assert resolve("auto", "slices")[:2] == (want[0], "slices")
  assert nio_jax.NIOConfig().pullback == "auto" and nio_jax.NIOConfig().conv == "auto"


@pytest.mark.parametrize(
  "num_chunks,pullback,conv,match",
  [
    (None, "segments", "none", "pullback='segments' does not exist in the sample-wise"),
    (4, "vmap", "none", "pullback='vmap' does not exist in the batch setting; valid there: vjp"),
    (4, "map", "none", "does not exist in the batch setting; valid there: vjp, loop, scan"),
    (4, "grad", "none", "unknown pullback 'grad'; known: vjp, loop, scan, segments, sites, auto"),
    (None, "vjp", "fft", "unknown conv 'fft'; known: none, slices, im2col, auto"),
  ],
)
def test_invalid_formulations_name_option_and_valid_values(num_chunks, pullback, conv, match):
  with pytest.raises(ValueError, match=match):
    formulation.check_formulation(num_chunks, pullback, conv)
  loss_fn, params, batch = _setup(b=8)
  with pytest.raises(ValueError, match=match):
    formulation.resolve_formulation(loss_fn, params, batch, num_chunks, pullback, conv)
  with pytest.raises(ValueError, match=match):
    cosine.gradcosine(loss_fn, params, batch, num_chunks=num_chunks, pullback=pullback, conv=conv)


def test_couples_examples_finds_batch_norm_only():
  with jax.enable_x64(True):
    for bn in (False, True):
      loss_fn, params, batch = _setup(bn=bn, b=6)
      assert jaxpr_rewrites.couples_examples(loss_fn, params, batch) is bn
  # a parameter with B rows reduced over its first axis is not the batch axis
  w = jnp.ones((4, 3))
  loss = lambda p, b: (b["x"] @ p["w"]).sum(-1) + jnp.sum(p["w"], axis=0).sum()
  assert not jaxpr_rewrites.couples_examples(loss, {"w": w}, {"x": jnp.ones((4, 4))})
  # a loss normalised by the batch mean couples the examples
  coupled = lambda p, b: (b["x"] @ p["w"]).sum(-1) - jnp.mean(b["x"] @ p["w"])
  assert jaxpr_rewrites.couples_examples(coupled, {"w": w}, {"x": jnp.ones((4, 4))})


def test_auto_batch_pullback_is_segments_only_where_exact_on_cpu():
  """docs/performance.md: in the batch setting "auto" runs `segments` on CPU for a loss
  without cross-example coupling, `loop` with batch norm and on other backends; the value
  of GradCosine (and of its gradient) is the explicit formulation's."""
  with jax.enable_x64(True):
    for bn, want_cpu in ((False, "segments"), (True, "loop")):
      loss_fn, params, batch = _setup(bn=bn, b=8)
      assert formulation.auto_subbatch_pullback(loss_fn, params, batch, "cpu") == want_cpu
      for backend in ("gpu", "tpu"):
        assert formulation.auto_subbatch_pullback(loss_fn, params, batch, backend) == "loop"
        form = formulation.resolve_formulation(loss_fn, params, batch, 3, backend=backend)
        assert form == formulation.Formulation("loop", "none")
      here = formulation.auto_subbatch_pullback(loss_fn, params, batch)
      resolve = lambda d, pb: formulation.resolve_formulation(loss_fn, params, batch, d, pb, "none")
      assert resolve(3, "auto") == formulation.Formulation(here, "none")
      # an explicit pullback stays as given, and the sample-wise setting is unaffected
      assert resolve(3, "vjp").pullback == "vjp"
      assert resolve(None, "auto").pullback == "vmap"

      def gc(p, pullback, loss_fn=loss_fn, batch=batch):
        return cosine.gradcosine_stats(
          loss_fn, p, batch, num_chunks=3, overlap=0.2, pullback=pullback, conv="none"
        ).gc

      auto, loop = gc(params, "auto"), gc(params, "loop")
      np.testing.assert_allclose(auto, loop, rtol=1e-10)
      g_auto = jax.grad(gc)(params, "auto")
      g_loop = jax.grad(gc)(params, "loop")
      np.testing.assert_allclose(_flat(g_auto), _flat(g_loop), rtol=1e-8, atol=1e-12)


def _has_remat(fn, *args):
  return "checkpoint" in str(jax.make_jaxpr(fn)(*args)) or "remat" in str(jax.make_jaxpr(fn)(*args))


def test_im2col_memory_guard_groups_then_falls_back(monkeypatch):
  """Over IM2COL_MAX_BYTES the work is split into groups that fit (rows under jax.checkpoint), and
  only when one row / example does not fit do convolutions stay plain; values unchanged."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(b=6)
    need = jaxpr_rewrites.im2col_bytes(loss_fn, params, batch)
    assert need > 0
    plan = lambda d, pb: formulation.plan_formulation(loss_fn, params, batch, d, pb, "im2col")
    # default budget: tiny model, nothing to split
    assert plan(3, "loop") == formulation.Formulation("loop", "im2col", None)
    assert plan(None, "vmap") == formulation.Formulation("vmap", "im2col", None)
    ref_s = _loop_sample_grads(loss_fn, params, batch, 6)
    bounds = per_example.subbatch_bounds(6, 3, 0.2)
    ref_b = [jax.grad(lambda p, a=a, e=e: loss_fn(p, batch)[a:e].mean())(params) for a, e in bounds]

    # Batch setting, budget for the forward patches + 2 rows: D=3 rows in groups of 2.
    monkeypatch.setattr(formulation, "IM2COL_MAX_BYTES", 3 * need)
    for pb in ("loop", "vjp", "scan"):
      assert plan(3, pb) == formulation.Formulation(pb, "im2col", 2)
      _assert_rows_equal(_subbatch_grads(loss_fn, params, batch, 3, 0.2, pb, "im2col"), ref_b)
    assert plan(3, "segments") == formulation.Formulation("segments", "im2col", None)  # 2·P fits
    stats = lambda p, d, pb: (
      cosine.gradcosine_stats(  # noqa: E731
        loss_fn,
        p,
        batch,
        num_chunks=d,
        overlap=0.0 if d is None else 0.2,
        pullback=pb,
        conv="im2col",
      ).gc
    )
    assert _has_remat(lambda p: stats(p, 3, "loop"), params)
    # Sample-wise, examples whose patches and cotangents fit: 2·P·c/B <= 3·P  =>  c = 9 >= 6.
    assert plan(None, "vmap") == formulation.Formulation("vmap", "im2col", None)
    monkeypatch.setattr(formulation, "IM2COL_MAX_BYTES", need // 2)  # 2·P·c/6 <= P/2: c = 1
    assert plan(None, "vmap") == formulation.Formulation("vmap", "im2col", 1)
    assert plan(None, "map") == formulation.Formulation("map", "im2col", 1)
    for pb in ("vmap", "map"):
      _assert_rows_equal(_sample_grads(loss_fn, params, batch, pb, "im2col"), ref_s)
    # example chunks: lax.map over chunks, without remat (see per_example.sample_grads_selected)
    jaxpr = str(jax.make_jaxpr(lambda p: stats(p, None, "vmap"))(params))
    assert "while" in jaxpr or "scan" in jaxpr
    # ... while one row next to the forward patches (P·2) does not fit: plain convolutions.
    for pb in ("loop", "vjp", "scan", "segments", "sites"):
      assert plan(3, pb) == formulation.Formulation(pb, "none", None)
    assert plan(None, "vjp") == formulation.Formulation("vjp", "none", None)
    assert not _has_remat(lambda p: stats(p, 3, "loop"), params)
    _assert_rows_equal(_subbatch_grads(loss_fn, params, batch, 3, 0.2, "loop", "im2col"), ref_b)
    # Below one example's patches: plain convolutions sample-wise too.
    monkeypatch.setattr(formulation, "IM2COL_MAX_BYTES", need // 100)
    assert plan(None, "vmap") == formulation.Formulation("vmap", "none", None)


@pytest.mark.parametrize(
  "setting,pb", [(None, "vmap"), (None, "map"), (None, "vjp"), (3, "loop"), (3, "scan")]
)
def test_grouped_second_order_equals_ungrouped(monkeypatch, setting, pb):
  """The NIO step's second-order pass through the groups (rows under remat) gives the same
  gradient (with the library's XLA defaults on: they broke a rematerialised example chunk)."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(b=6)
    ov = 0.0 if setting is None else 0.2

    def grad_gc():
      return _flat(
        jax.grad(
          lambda p: (
            cosine.gradcosine_stats(
              loss_fn, p, batch, num_chunks=setting, overlap=ov, pullback=pb, conv="im2col"
            ).gc
          )
        )(params)
      )

    ref = grad_gc()
    need = jaxpr_rewrites.im2col_bytes(loss_fn, params, batch)
    own_forward = pb in ("vmap", "map")
    monkeypatch.setattr(formulation, "IM2COL_MAX_BYTES", need // 2 if own_forward else 3 * need)
    assert formulation.plan_formulation(loss_fn, params, batch, setting, pb, "im2col").group in (
      1,
      2,
    )
    np.testing.assert_allclose(grad_gc(), ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["gradinit", "metainit"])
def test_search_steps_apply_the_im2col_memory_guard(monkeypatch, method):
  """GradInit and MetaInit run im2col where 2·P fits `IM2COL_MAX_BYTES` and plain (canonical)
  convolutions where it does not, like the NIO step's one-forward pullbacks."""
  from nio_jax import scales as scmod
  from nio_jax.methods.gradinit import GradInitConfig, make_gradinit_step
  from nio_jax.methods.metainit import MetaInitConfig, make_metainit_step

  loss_fn, params, batch = _setup(b=4)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  batch = {"x": batch["x"].astype(jnp.float32), "y": batch["y"]}
  need = 2 * jaxpr_rewrites.im2col_bytes(loss_fn, params, batch)
  assert formulation.guard_conv(loss_fn, params, batch, "slices") == "slices"
  s0, spec = scmod.init_scales(params)

  def convs(budget):
    monkeypatch.setattr(formulation, "IM2COL_MAX_BYTES", budget)
    assert formulation.guard_conv(loss_fn, params, batch, "im2col") == (
      "im2col" if budget >= need else "none"
    )
    fresh = lambda p, bt: loss_fn(p, bt)  # a new loss: no step traced with another budget
    if method == "gradinit":
      cfg = GradInitConfig.create(None, batch_size=4, conv="im2col")
      search = make_gradinit_step(fresh, spec, cfg)
      args = (params, s0, search.init(s0), batch, batch)
    else:
      cfg = MetaInitConfig.create(conv="im2col")
      search = make_metainit_step(fresh, spec, cfg)
      args = (params, s0, search.init(s0), batch)
    return str(jax.make_jaxpr(search.step)(*args)).count("conv_general_dilated")

  assert convs(need) == 0
  assert convs(need - 1) > 0
