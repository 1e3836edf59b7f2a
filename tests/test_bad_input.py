"""Bad input gets a clear error naming the problem, and never NaN params."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from tests import tiny_models as tm

KEY = jax.random.PRNGKey(0)
P = tm.mlp_params(KEY)
B = tm.mlp_batch(KEY, b=8)


def test_batch_of_one():
  with pytest.raises(ValueError, match="at least 2"):
    nio_jax.gradcosine(tm.mlp_loss, P, tm.mlp_batch(KEY, b=1))


def test_more_chunks_than_examples():
  with pytest.raises(ValueError, match="larger than the batch size"):
    nio_jax.gradcosine(tm.mlp_loss, P, B, num_chunks=9)


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_outside_unit_interval(overlap):
  with pytest.raises(ValueError, match="outside"):
    nio_jax.gradcosine(tm.mlp_loss, P, B, num_chunks=2, overlap=overlap)


def test_overlap_without_chunks():
  with pytest.raises(ValueError, match="batch setting"):
    nio_jax.gradcosine(tm.mlp_loss, P, B, overlap=0.2)


def test_scales_tree_mismatch():
  scales, _ = nio_jax.init_scales(P)
  del scales["dense1"]
  with pytest.raises(ValueError, match="tree structure"):
    nio_jax.apply_scales(P, scales)


def test_stacked_scale_length_mismatch():
  with pytest.raises(ValueError, match="leading axis"):
    nio_jax.apply_scales({"a": jnp.ones((3, 2))}, {"a": jnp.ones(2)})


def test_zero_gradient_example_is_reported():
  def loss(p, batch):  # example 0 is masked out: its gradient is exactly zero
    return tm.mlp_loss(p, batch) * batch["m"]

  mb = dict(B, m=(jnp.arange(8) > 0).astype(jnp.float32))
  with pytest.raises(nio_jax.ZeroGradientError, match=r"\[0\]") as e:
    nio_jax.gradcosine(loss, P, mb)
  assert e.value.indices == [0]
  with pytest.raises(nio_jax.ZeroGradientError, match="step 0"):
    nio_jax.nio(loss, P, [mb], {"num_steps": 2, "num_chunks": None, "overlap": 0.0})


def test_non_finite_loss_stops_with_step_and_last_good_params():
  def loss(p, batch):  # finite on the first two batches, NaN on the third (sqrt(-1))
    return tm.mlp_loss(p, batch) * jnp.sqrt(batch["m"].astype(jnp.float32))

  good = dict(B, m=jnp.ones((8,), jnp.int32))
  bad = dict(B, m=-jnp.ones((8,), jnp.int32))
  with pytest.raises(nio_jax.NonFiniteError, match="step 2") as e:
    nio_jax.nio(loss, P, [good, good, bad, good], {"num_steps": 4, "lr": 0.05})
  assert e.value.step == 2
  last = e.value.last_good
  assert last.num_steps == 2
  for leaf in jax.tree_util.tree_leaves(last.params):
    assert np.all(np.isfinite(leaf))


def test_nan_input_batch():
  bad = dict(B, x=B["x"].at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="NaN"):
    nio_jax.gradcosine(tm.mlp_loss, P, bad)


def test_scalar_loss_fn():
  with pytest.raises(ValueError, match="per-example losses"):
    nio_jax.gradcosine(lambda p, b: jnp.mean(tm.mlp_loss(p, b)), P, B)
  with pytest.raises(ValueError, match="per-example losses"):
    nio_jax.nio(lambda p, b: jnp.mean(tm.mlp_loss(p, b)), P, [B])


def test_integer_params():
  with pytest.raises(TypeError, match="floating point"):
    nio_jax.gradcosine(tm.mlp_loss, jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), P), B)


def test_no_scalable_leaves():
  zeros = jax.tree_util.tree_map(jnp.zeros_like, P)
  with pytest.raises(ValueError, match="no scalable leaf"):
    nio_jax.init_scales(zeros)


def test_mismatched_batch_leaves():
  with pytest.raises(ValueError, match="disagree"):
    nio_jax.gradcosine(tm.mlp_loss, P, {"x": B["x"], "y": B["y"][:5]})


@pytest.mark.parametrize(
  "bad,match",
  [
    ({"gamma": 0.0}, "gamma"),
    ({"lr": -1.0}, "lr"),
    ({"num_steps": 0}, "num_steps"),
    ({"objective": "gv"}, "objective"),
    ({"overlap": 1.2}, "outside"),
    ({"num_chunks": 1}, "at least 2"),
    ({"typo": 1}, "unknown NIO config"),
    (
      {"pullback": "magic"},
      "unknown pullback 'magic'; known: vjp, loop, scan, segments, sites, auto",
    ),
    ({"pullback": "vmap"}, "pullback='vmap' does not exist in the batch setting"),
    (
      {"num_chunks": None, "overlap": 0.0, "pullback": "segments"},
      "valid there: vjp, loop, scan, vmap, map",
    ),
    ({"conv": "fft"}, "unknown conv 'fft'; known: none, slices, im2col, auto"),
  ],
)
def test_bad_config(bad, match):
  with pytest.raises((ValueError, TypeError), match=match):
    nio_jax.NIOConfig.create(bad)


def test_batches_run_out_and_single_batch():
  with pytest.raises(ValueError, match="ran out at step 2"):
    nio_jax.nio(tm.mlp_loss, P, iter([B, B]), {"num_steps": 3})
  with pytest.raises(TypeError, match="not a single batch"):
    nio_jax.nio(tm.mlp_loss, P, B, {"num_steps": 1})
  # A list is cycled and an infinite iterator is fine.
  r = nio_jax.nio(tm.mlp_loss, P, itertools.repeat(B), {"num_steps": 2})
  assert r.num_steps == 2


def test_batch_size_change_during_search():
  with pytest.raises(ValueError, match="batch size changed"):
    nio_jax.nio(
      tm.mlp_loss, P, [B, tm.mlp_batch(KEY, b=6)], {"num_steps": 2, "num_chunks": 2, "overlap": 0.0}
    )


# ------------------------------------------------------------------ issue 29: clear errors


@pytest.mark.parametrize(
  "call",
  [
    lambda: nio_jax.nio(P, tm.mlp_loss, [B]),
    lambda: nio_jax.gradinit(P, tm.mlp_loss, [B]),
    lambda: nio_jax.metainit(P, tm.mlp_loss, [B]),
    lambda: nio_jax.lsuv(P, tm.mlp_loss, [B]),
    lambda: nio_jax.measure(P, tm.mlp_loss, [B]),
    lambda: nio_jax.methods.initialize("nio", P, tm.mlp_loss, [B]),
    lambda: nio_jax.methods.initialize("kaiming", P, tm.mlp_loss, None),
  ],
  ids=["nio", "gradinit", "metainit", "lsuv", "measure", "initialize", "initialize_kaiming"],
)
def test_swapped_loss_fn_and_params_name_the_order(call):
  with pytest.raises(TypeError, match=r"got the callable mlp_loss.*\(loss_fn, params, \.\.\.\)"):
    call()


def test_init_result_repr_is_short():
  res = nio_jax.nio(tm.mlp_loss, P, [B], {"num_steps": 2, "num_chunks": None, "overlap": 0.0})
  text = repr(res)
  assert text.startswith("InitResult(method='nio', steps=2, params=4 leaves/") and "\n" not in text
  assert "scales=4 in [" in text and "final: gc=" in text and "Array(" not in text
  assert len(text) < 300 and str(res) == text


def test_gradinit_batch_size_warning_points_at_the_users_call():
  with pytest.warns(UserWarning, match="expects batches of 4") as rec:
    nio_jax.methods.initialize("gradinit", tm.mlp_loss, P, [B], {"num_steps": 1, "batch_size": 4})
  assert [w.filename for w in rec] == [__file__]


def _loss_error(loss_fn, params, batch) -> nio_jax.errors.LossFnError:
  with pytest.raises(nio_jax.errors.LossFnError) as e:
    nio_jax.measure(loss_fn, params, [batch])
  assert e.value.__cause__ is not None  # the original exception is chained
  return e.value


def test_loss_fn_error_missing_rng_stream_keeps_flax_message_whole():
  import flax.linen as nn

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))

  model = Drop()
  params = model.init(KEY, B["x"], train=False)["params"]
  err = _loss_error(lambda p, b: tm.xent(model.apply({"params": p}, b["x"]), b["y"]), params, B)
  msg = str(err)
  assert "InvalidRngError" in msg and "needs PRNG for" in msg
  url = "https://flax.readthedocs.io/en/latest/api_reference/flax.errors.html#flax.errors.InvalidRngError)"
  assert url in msg  # not cut mid-URL
  assert "'dropout' rng stream" in msg and "linen_loss_fn" in msg


def test_loss_fn_error_nnx_trace_level_names_nnx_loss_fn():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(5, 3, rngs=rngs)
      self.bn = nnx.BatchNorm(3, rngs=rngs)  # train mode: updates its statistics

    def __call__(self, x):
      return self.bn(self.lin(x))

  graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)

  def loss(p, b):  # reuses the model's own mutable state inside the trace
    return tm.xent(nnx.merge(graphdef, p, rest)(b["x"]), b["y"])

  msg = str(_loss_error(loss, params, B))
  assert "TraceContextError" in msg and "different trace level" in msg
  assert "nio_jax.flax_utils.nnx_loss_fn(model)" in msg and "fresh copy" in msg


def test_loss_fn_error_unexpected_keyword_names_train_flag():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool = False):
      return nn.Dense(3)(x)

  model = Net()
  params = model.init(KEY, B["x"])["params"]
  loss = lambda p, b: tm.xent(model.apply({"params": p}, b["x"], train=True), b["y"])
  msg = str(_loss_error(loss, params, B))
  assert "unexpected keyword argument 'train'" in msg
  assert "has no 'train' argument" in msg and "train_flag='training'" in msg


def test_loss_fn_error_shape_mismatch():
  wide = dict(B, x=jnp.ones((8, 6)))
  msg = str(_loss_error(tm.mlp_loss, P, wide))
  assert "Likely cause: a shape mismatch" in msg and "model.init" in msg
  assert "'x': (8, 6)" in msg


def test_loss_fn_error_tuple_batch_names_the_accessors():
  batch = (B["x"], B["y"])
  msg = str(_loss_error(tm.mlp_loss, P, batch))
  assert "tuple indices must be integers" in msg
  assert "inputs=0, labels=1" in msg and "((8, 5), (8,))" in msg


def test_loss_fn_error_other_causes_keep_the_generic_advice():
  msg = str(_loss_error(tm.mlp_loss, {"w": P}, B))
  assert "Check that params belong to the model" in msg and "Likely cause" not in msg
