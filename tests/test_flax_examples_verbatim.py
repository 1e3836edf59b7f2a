"""Every search method on model code nobody here wrote (issue 29, item 2).

The models are copied verbatim from google/flax's `examples/` into `tests/flax_examples/`
(each file names its source path, commit and licence): the linen MNIST CNN, the ImageNet
ResNet with BatchNorm, the lm1b Transformer with dropout, the NNX MNIST CNN with BatchNorm and
Dropout, and the NNX toy train-state MLP with hand-written `w`/`b` layers. Each runs through
`nio_jax.flax_utils` at tiny sizes with NIO (batch setting and sample-wise), GradInit,
MetaInit and LSUV, then trains for 3 steps in a plain optax loop written as a user would,
from the result's params. The search must leave the model's own variables (batch statistics,
NNX state, call counters) untouched, and dropout must really be on during a search.

Three cases first failed here and were fixed in the adapters: the ResNet's
`nn.BatchNorm(axis_name="batch")` (`linen_loss_fn(axis_name=...)`,
`test_resnet_axis_name_adapter`), lm1b's attention dropout with `dropout=False`
(`test_lm1b_dropout_off`) and the NNX CNN's call-time `rngs` (`test_nnx_cnn_call_rngs`).
The search tests still run the ResNet through the user-side wrapper `with_batch_axis` and the
NNX CNN through `WithRngs`, so both ways stay covered.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nio_jax
from nio_jax import leaves, stochastic
from nio_jax.flax_utils import linen_loss_fn, nnx_leaf_kinds, nnx_loss_fn
from tests.flax_examples import (
  imagenet_models,
  linen_mnist_cnn,
  lm1b_models,
  nnx_mnist_cnn,
  nnx_toy_mlp,
)

B = 8
STEPS = 2
METHODS = ("nio_batch", "nio_samplewise", "gradinit", "metainit", "lsuv")


def _finite_tree(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


def _snapshot(tree):
  def copy(a):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # nnx.Rngs keys
      a = jax.random.key_data(a)
    return np.array(a)

  return jax.tree_util.tree_map(copy, tree)


def _assert_same(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _search(method, loss_fn, params, batches, lsuv_batches):
  """One search through the public API, at a tiny step count."""
  if method == "nio_batch":
    cfg = {
      "num_steps": STEPS,
      "num_chunks": 2,
      "overlap": 0.0,
    }
    return nio_jax.nio(loss_fn, params, batches, cfg)
  if method == "nio_samplewise":
    cfg = {
      "num_steps": STEPS,
      "num_chunks": None,
      "overlap": 0.0,
    }
    return nio_jax.nio(loss_fn, params, batches, cfg)
  if method == "gradinit":
    return nio_jax.gradinit(loss_fn, params, batches, {"num_steps": STEPS})
  if method == "metainit":
    return nio_jax.metainit(loss_fn, params, batches, {"num_steps": STEPS})
  if method == "lsuv":
    return nio_jax.lsuv(loss_fn, params, lsuv_batches)
  raise AssertionError(method)


def _check_result(method, result, params0):
  assert _finite_tree(result.params), method
  for name, v in result.history.items():
    v = np.asarray(v)
    if np.issubdtype(v.dtype, np.number):  # LSUV's history also names its layers
      assert np.all(np.isfinite(v)), (method, name, v)
  # Same tree as the params the search was given.
  assert jax.tree_util.tree_structure(result.params) == jax.tree_util.tree_structure(params0)
  if method.startswith("nio"):
    changed = [
      not np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree_util.tree_leaves(result.params), jax.tree_util.tree_leaves(params0))
    ]
    assert any(changed), "NIO changed no parameter"


def _slow_unless(method, fast):
  """The methods in `fast` run by default; the rest are marked slow (CI runs them)."""
  return pytest.param(method, marks=() if method in fast else pytest.mark.slow, id=method)


# ------------------------------------------------------------------ linen MNIST CNN


def _cnn_data():
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (2 * B, 8, 8, 1))
  y = jax.random.randint(jax.random.PRNGKey(1), (2 * B,), 0, 10)
  return [(x[:B], y[:B]), (x[B:], y[B:])]


@pytest.mark.parametrize("method", [_slow_unless(m, ("nio_batch",)) for m in METHODS])
def test_linen_mnist_cnn(method):
  model = linen_mnist_cnn.CNN()
  batches = _cnn_data()  # tuple batches (x, y)
  variables = model.init(jax.random.PRNGKey(0), batches[0][0])
  before = _snapshot(variables)
  loss_fn = linen_loss_fn(model)  # no train flag, no dropout, no batch stats
  # LSUV gets bare input arrays: it needs no labels.
  result = _search(method, loss_fn, variables["params"], batches, [b[0] for b in batches])
  _check_result(method, result, variables["params"])
  _assert_same(variables, before)

  # The user's own optax loop (the example's apply_model), from the result.
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params, opt_state = result.params, tx.init(result.params)
  for i in range(3):
    params, opt_state, value = step(params, opt_state, *batches[i % 2])
    assert np.isfinite(float(value))


# ------------------------------------------------------------------ ImageNet ResNet (BatchNorm)


def _resnet():
  # The example's own test-only ResNet (`_ResNet1`: one stage of one block), built from the
  # file's public names, at 4 filters on 16x16x3.
  return imagenet_models.ResNet(
    stage_sizes=[1], block_cls=imagenet_models.ResNetBlock, num_classes=3, num_filters=4
  )


def _resnet_data():
  x = jax.random.normal(jax.random.PRNGKey(2), (2 * B, 16, 16, 3)) * 2.0 + 0.5
  y = jax.random.randint(jax.random.PRNGKey(3), (2 * B,), 0, 3)
  return [{"image": x[:B], "label": y[:B]}, {"image": x[B:], "label": y[B:]}]


def with_batch_axis(loss_fn, axis_name="batch"):
  """User-side workaround for a model whose BatchNorm has `axis_name` (the example's
  `axis_name='batch'`, meant for `pmap`): run the loss under a one-element `vmap` that binds
  the axis, so the cross-device mean is over the batch itself. The adapter's attributes are
  carried over."""

  def lift(fn):
    def wrapped(params, batch):
      one = jax.tree_util.tree_map(lambda a: a[None], batch)
      out = jax.vmap(lambda b: fn(params, b), axis_name=axis_name)(one)
      return jax.tree_util.tree_map(lambda a: a[0], out)

    return wrapped

  out = lift(loss_fn)
  out.forward = lift(loss_fn.forward)
  out.module_kinds = loss_fn.module_kinds
  out.rng_seed = loss_fn.rng_seed
  return out


def test_resnet_axis_name_adapter():
  """flax's ImageNet ResNet builds nn.BatchNorm(axis_name='batch') for pmap: without
  `axis_name` the adapter's input check names the fix; with it, the loss equals the user-side
  one-element vmap workaround."""
  model = _resnet()
  batches = _resnet_data()
  variables = model.init(jax.random.PRNGKey(0), batches[0]["image"])
  plain = linen_loss_fn(model, batch_stats=variables["batch_stats"])
  with pytest.raises(nio_jax.errors.LossFnError, match="axis_name='batch'"):
    nio_jax.measure(plain, variables["params"], batches, num_batches=1)
  fixed = linen_loss_fn(model, batch_stats=variables["batch_stats"], axis_name="batch")
  np.testing.assert_allclose(
    fixed(variables["params"], batches[0]),
    with_batch_axis(plain)(variables["params"], batches[0]),
    rtol=1e-6,
  )


@pytest.mark.parametrize("method", [_slow_unless(m, ("nio_samplewise",)) for m in METHODS])
def test_imagenet_resnet_batchnorm(method):
  model = _resnet()
  batches = _resnet_data()
  variables = model.init(jax.random.PRNGKey(0), batches[0]["image"])
  before = _snapshot(variables)
  loss_fn = with_batch_axis(linen_loss_fn(model, batch_stats=variables["batch_stats"]))
  assert loss_fn.module_kinds  # the BatchNorm modules, from batch_stats
  # Training mode: batch statistics, not the running ones.
  eval_logits = jax.vmap(lambda x: model.apply(variables, x, train=False), axis_name="batch")(
    batches[0]["image"][None]
  )[0]
  eval_losses = optax.softmax_cross_entropy_with_integer_labels(eval_logits, batches[0]["label"])
  assert not np.allclose(loss_fn(variables["params"], batches[0]), eval_losses)

  result = _search(method, loss_fn, variables["params"], batches, [{"image": batches[0]["image"]}])
  _check_result(method, result, variables["params"])
  _assert_same(variables, before)  # batch_stats untouched by the search

  # The user's loop, as the example's train_step: BN statistics updated via mutable.
  tx = optax.sgd(0.05, momentum=0.9)

  def step(params, batch_stats, opt_state, batch):
    def loss(p):
      logits, new_state = model.apply(
        {"params": p, "batch_stats": batch_stats}, batch["image"], mutable=["batch_stats"]
      )
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return ce, new_state["batch_stats"]

    (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, value

  pstep = jax.jit(jax.vmap(step, axis_name="batch"))
  state = jax.tree_util.tree_map(
    lambda a: a[None], (result.params, variables["batch_stats"], tx.init(result.params))
  )
  for i in range(3):
    batch = jax.tree_util.tree_map(lambda a: a[None], batches[i % 2])
    *state, value = pstep(*state, batch)
    assert np.isfinite(float(value[0]))
  new_stats = jax.tree_util.tree_map(lambda a: a[0], state[1])
  assert not np.allclose(
    jax.tree_util.tree_leaves(new_stats)[0], jax.tree_util.tree_leaves(before["batch_stats"])[0]
  )


# ------------------------------------------------------------------ lm1b Transformer (dropout)


def _lm():
  cfg = lm1b_models.TransformerConfig(
    vocab_size=13,
    output_vocab_size=13,
    emb_dim=8,
    num_heads=2,
    num_layers=1,
    qkv_dim=8,
    mlp_dim=16,
    max_len=16,
    dropout_rate=0.3,
    attention_dropout_rate=0.3,
  )
  return lm1b_models.TransformerLM(cfg)


def _lm_data():
  t = jax.random.randint(jax.random.PRNGKey(4), (2 * B, 6), 1, 13)
  return [{"inputs": t[:B]}, {"inputs": t[B:]}]


def token_losses(logits, targets):
  """Per-example token-mean cross-entropy `[B]` (the LM predicts each input token; the model
  shifts its inputs right itself)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=-1)


def _lm_loss_fn(model, **kw):
  # The config's `deterministic=False` switches dropout; the call has no train flag.
  return linen_loss_fn(
    model, train_flag=None, losses=token_losses, inputs="inputs", labels="inputs", **kw
  )


def _lm_init(model, tokens):
  keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  return model.init(keys, tokens)


def test_lm1b_dropout_is_on_during_a_search():
  model = _lm()
  batches = _lm_data()
  variables = _lm_init(model, batches[0]["inputs"])
  on = _lm_loss_fn(model)
  assert on.rng_seed == 0
  a = on(variables["params"], stochastic.keyed_batch(on, batches[0], 0))
  b = on(variables["params"], stochastic.keyed_batch(on, batches[0], 1))
  assert a.shape == (B,) and not np.allclose(a, b)  # a fresh dropout key per batch
  # The same key gives the same masks.
  np.testing.assert_array_equal(
    a, on(variables["params"], stochastic.keyed_batch(on, batches[0], 0))
  )


def test_lm1b_dropout_off():
  model = _lm()
  batches = _lm_data()
  variables = _lm_init(model, batches[0]["inputs"])
  off = _lm_loss_fn(model, dropout=False)
  assert off.rng_seed is None
  assert stochastic.keyed_batch(off, batches[0], 1) is batches[0]
  np.testing.assert_array_equal(
    off(variables["params"], batches[0]), off(variables["params"], batches[0])
  )
  # dropout=False is exactly the model with dropout switched off in its config.
  det = lm1b_models.TransformerLM(model.config.replace(deterministic=True))
  ref = token_losses(det.apply(variables, batches[0]["inputs"]), batches[0]["inputs"])
  np.testing.assert_allclose(off(variables["params"], batches[0]), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [_slow_unless(m, ()) for m in METHODS])
def test_lm1b_transformer(method):
  model = _lm()
  batches = _lm_data()
  variables = _lm_init(model, batches[0]["inputs"])
  before = _snapshot(variables)
  loss_fn = _lm_loss_fn(model)
  result = _search(method, loss_fn, variables["params"], batches, batches)
  _check_result(method, result, variables["params"])
  _assert_same(variables, before)

  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, tokens, key):
    def loss(p):
      logits = model.apply({"params": p}, tokens, rngs={"dropout": key})
      return token_losses(logits, tokens).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params, opt_state = result.params, tx.init(result.params)
  for i in range(3):
    key = jax.random.PRNGKey(100 + i)
    params, opt_state, value = step(params, opt_state, batches[i % 2]["inputs"], key)
    assert np.isfinite(float(value))


# ------------------------------------------------------------------ NNX MNIST CNN


def _nnx_cnn_data():
  # The example's Linear(3136, 256) fixes the input at 28x28x1.
  x = jax.random.normal(jax.random.PRNGKey(5), (2 * B, 28, 28, 1))
  y = jax.random.randint(jax.random.PRNGKey(6), (2 * B,), 0, 10)
  return [(x[:B], y[:B]), (x[B:], y[B:])]


class WithRngs(nnx.Module):
  """User-side workaround: the example's CNN takes its dropout `rngs` as a call argument;
  holding an `nnx.Rngs` in a wrapper module lets the adapter reseed it for every batch."""

  def __init__(self, model, rngs):
    self.model = model
    self.rngs = rngs

  def __call__(self, x):
    return self.model(x, self.rngs)


def test_nnx_cnn_call_rngs():
  model = nnx_mnist_cnn.CNN(nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=1)
  count = int(rngs.dropout.count[...])
  loss_fn, params = nnx_loss_fn(model, call_kwargs={"rngs": rngs})
  data = _nnx_cnn_data()[0]
  a = jax.jit(loss_fn)(params, stochastic.keyed_batch(loss_fn, data, 0))
  b = jax.jit(loss_fn)(params, stochastic.keyed_batch(loss_fn, data, 1))
  assert not np.allclose(a, b)  # a fresh Rngs per batch: new dropout masks
  assert int(rngs.dropout.count[...]) == count  # the user's Rngs is never mutated


def test_nnx_cnn_dropout_is_on_during_a_search():
  model = nnx_mnist_cnn.CNN(nnx.Rngs(0))
  wrapped = WithRngs(model, nnx.Rngs(dropout=1))
  batch = _nnx_cnn_data()[0]
  on, params = nnx_loss_fn(wrapped)
  a = on(params, stochastic.keyed_batch(on, batch, 0))
  b = on(params, stochastic.keyed_batch(on, batch, 1))
  assert not np.allclose(a, b)
  off, params = nnx_loss_fn(wrapped, dropout=False)
  np.testing.assert_array_equal(off(params, batch), off(params, batch))
  # Dropout off without the wrapper: the model's `rngs` argument is then unused.
  off2, params2 = nnx_loss_fn(model, dropout=False, call_kwargs={"rngs": None})
  np.testing.assert_allclose(off2(params2, batch), off(params, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [_slow_unless(m, ("nio_batch",)) for m in METHODS])
def test_nnx_mnist_cnn(method):
  model = nnx_mnist_cnn.CNN(nnx.Rngs(0))
  wrapped = WithRngs(model, nnx.Rngs(dropout=1))
  batches = _nnx_cnn_data()
  state_before = _snapshot(nnx.state(wrapped))
  loss_fn, params = nnx_loss_fn(wrapped)
  kinds = loss_fn.module_kinds
  assert kinds[("model", "batch_norm1")] == "batch_norm"
  result = _search(method, loss_fn, params, batches, [b[0] for b in batches])
  _check_result(method, result, params)
  # Nothing in the model changed: BatchNorm mean/var, RNG counters, params.
  _assert_same(_snapshot(nnx.state(wrapped)), state_before)

  nnx.update(wrapped, result.params)
  _assert_same(nnx.state(model, nnx.Param), _snapshot(result.params["model"]))
  mean0 = np.array(model.batch_norm1.mean[...])
  # The user's loop, as the example's train_step (rngs passed to the call).
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  rngs = nnx.Rngs(dropout=7)

  @nnx.jit
  def train_step(model, optimizer, rngs, x, y):
    def loss(m, rngs):
      logits = m(x, rngs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, grads = nnx.value_and_grad(loss)(model, rngs)
    optimizer.update(model, grads)
    return value

  model.train()
  for i in range(3):
    value = train_step(model, optimizer, rngs, *batches[i % 2])
    assert np.isfinite(float(value))
  assert not np.allclose(model.batch_norm1.mean[...], mean0)  # BN updates in the user's loop


# ------------------------------------------------------------------ NNX toy train-state MLP


def mse_losses(pred, target):
  return ((pred - target) ** 2).mean(axis=-1)


def _toy_data():
  x = jax.random.uniform(jax.random.PRNGKey(7), (2 * B, 1))
  y = 0.8 * x**2 + 0.1
  return [(x[:B], y[:B]), (x[B:], y[B:])]


@pytest.mark.parametrize(
  "method", [_slow_unless(m, ("nio_batch", "gradinit", "lsuv")) for m in METHODS]
)
def test_nnx_toy_train_state_mlp(method):
  model = nnx_toy_mlp.MLP(din=1, dhidden=4, dout=1, rngs=nnx.Rngs(0))
  batches = _toy_data()
  state_before = _snapshot(nnx.state(model))
  loss_fn, params = nnx_loss_fn(model, losses=mse_losses)
  # The hand-written layers' `w` / `b` are a kernel and a bias (no `grad_filter` needed).
  kinds = nnx_leaf_kinds(model)
  w = (jax.tree_util.DictKey("linear1"), jax.tree_util.DictKey("w"))
  assert kinds.kind(w) == leaves.KERNEL
  result = _search(method, loss_fn, params, batches, [b[0] for b in batches])
  _check_result(method, result, params)
  _assert_same(_snapshot(nnx.state(model)), state_before)
  assert int(model.count.value) == 0  # the search's calls ran on copies

  # The example's own train-state loop (split into graphdef, params, counts), from the result.
  nnx.update(model, result.params)
  graphdef, params, counts = nnx.split(model, nnx.Param, nnx_toy_mlp.Count)
  tx = optax.sgd(0.1)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, counts, opt_state, x, y):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, counts, copy=True)
      loss = jnp.mean((y - m(x)) ** 2)
      return loss, nnx.state(m, nnx_toy_mlp.Count)

    (value, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), counts, opt_state, value

  for i in range(3):
    params, counts, opt_state, value = train_step(params, counts, opt_state, *batches[i % 2])
    assert np.isfinite(float(value))
  assert int(nnx.merge(graphdef, params, counts).count.value) == 3
