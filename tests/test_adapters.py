"""The Flax adapters on models a user brings: NNX and linen with BatchNorm and Dropout, any
training flag, any batch structure; and the per-batch keys of stochastic losses."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nio_jax
from nio_jax import stochastic
from nio_jax.flax_utils import classification_losses, linen_loss_fn, nnx_loss_fn, train_flag_of

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (8, 6, 6, 1))
Y = jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 3)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    return self.head(self.drop(h.mean(axis=(1, 2))))


class NNXDropoutOnly(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(36, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.l1(x.reshape(x.shape[0], -1)))))


class LinenNet(nn.Module):
  """Dropout behind a flag spelled `training`, defaulting to evaluation."""

  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not training)(x)
    return nn.Dense(3)(x)


class LinenDeterministic(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3)(nn.Dropout(0.5)(x, deterministic=deterministic))


def _host(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.array(x)


def _state(model, kind):
  return jax.tree_util.tree_map(_host, nnx.state(model, kind))


# ------------------------------------------------------------------ NNX


@pytest.mark.parametrize("method", ["nio_b", "nio_sw", "gradinit", "metainit", "lsuv"])
def test_nnx_batchnorm_dropout_every_method_leaves_model_unchanged(method):
  model = NNXNet(nnx.Rngs(0))
  stats, rng_state = _state(model, nnx.BatchStat), _state(model, nnx.RngState)
  params_before = _state(model, nnx.Param)
  loss_fn, params = nnx_loss_fn(model)
  assert loss_fn.rng_seed == 0
  batches = [(X, Y)]
  run = {
    "nio_b": lambda: nio_jax.nio(loss_fn, params, batches, {"num_steps": 2, "num_chunks": 2}),
    "nio_sw": lambda: nio_jax.nio(
      loss_fn, params, batches, {"num_steps": 2, "num_chunks": None, "overlap": 0.0}
    ),
    "gradinit": lambda: nio_jax.gradinit(loss_fn, params, batches, {"num_steps": 2}),
    "metainit": lambda: nio_jax.metainit(loss_fn, params, batches, {"num_steps": 2}),
    "lsuv": lambda: nio_jax.lsuv(loss_fn, params, batches),
  }[method]
  result = run()
  for leaf in jax.tree_util.tree_leaves(result.params):
    assert np.all(np.isfinite(leaf))
  # The search changed nothing in the model: statistics, RNG counters, params.
  chex.assert_trees_all_equal(_state(model, nnx.BatchStat), stats)
  chex.assert_trees_all_equal(_state(model, nnx.RngState), rng_state)
  chex.assert_trees_all_equal(_state(model, nnx.Param), params_before)
  # ... until the user puts the result back; then their own loop trains.
  nnx.update(model, result.params)
  model.train()
  opt = nnx.Optimizer(model, __import__("optax").sgd(0.01), wrt=nnx.Param)

  @nnx.jit
  def step(m, o):
    value, grads = nnx.value_and_grad(lambda m: classification_losses(m(X), Y).mean())(m)
    o.update(m, grads)
    return value

  assert np.isfinite(float(step(model, opt)))


def test_nnx_eager_call_uses_batch_statistics_and_changes_nothing():
  model = NNXNet(nnx.Rngs(0))
  stats = _state(model, nnx.BatchStat)
  loss_fn, params = nnx_loss_fn(model, dropout=False)
  losses = loss_fn(params, {"image": X, "label": Y})
  chex.assert_trees_all_equal(_state(model, nnx.BatchStat), stats)
  # Training mode (batch statistics) differs from evaluation mode (running statistics).
  eval_fn, _ = nnx_loss_fn(model, train=False)
  assert not np.allclose(losses, eval_fn(params, {"image": X, "label": Y}))
  # Training-mode reference by hand: a copy of the model in train mode, dropout off.
  ref = nnx.clone(model)
  ref.train()
  ref.drop.deterministic = True
  np.testing.assert_allclose(losses, classification_losses(ref(X), Y), rtol=1e-6)


def test_nnx_dropout_on_is_fresh_per_key_and_off_is_deterministic():
  model = NNXDropoutOnly(nnx.Rngs(0))
  on, params = nnx_loss_fn(model)
  off, _ = nnx_loss_fn(model, dropout=False)
  b = (X, Y)
  k0, k1 = stochastic.keyed_batch(on, b, 0), stochastic.keyed_batch(on, b, 1)
  assert not np.allclose(on(params, k0), on(params, k1))
  np.testing.assert_array_equal(on(params, k0), on(params, k0))
  assert off.rng_seed is None
  eval_fn, _ = nnx_loss_fn(model, train=False)
  np.testing.assert_allclose(off(params, b), eval_fn(params, b), rtol=1e-6)


# ------------------------------------------------------------------ linen


def test_train_flag_found_in_signature():
  assert train_flag_of(LinenNet().__call__) == "training"
  assert train_flag_of(LinenDeterministic().__call__) == "deterministic"

  class NoFlag(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  assert train_flag_of(NoFlag().__call__) is None


@pytest.mark.parametrize("cls", [LinenNet, LinenDeterministic])
def test_linen_dropout_on_by_default_off_on_request(cls):
  model = cls()
  variables = model.init(KEY, X)
  b = (X, Y)
  on = linen_loss_fn(model)
  evaluation = linen_loss_fn(model, train=False)(variables["params"], b)
  off = linen_loss_fn(model, dropout=False)(variables["params"], b)
  # Train mode with dropout on differs from evaluation; off equals evaluation here (no BN).
  assert not np.allclose(on(variables["params"], stochastic.keyed_batch(on, b)), evaluation)
  np.testing.assert_allclose(off, evaluation, rtol=1e-6)
  # The flag reaches the model: evaluation equals a plain apply without it.
  ref = classification_losses(model.apply(variables, X), Y)
  np.testing.assert_allclose(evaluation, ref, rtol=1e-6)


def test_linen_apply_kwargs_merge_with_the_flag_and_the_dropout_key():
  model = LinenNet()
  variables = model.init(KEY, X)
  b = {"x": X, "y": Y}
  key = jax.random.PRNGKey(7)
  # A user's own rngs: the flag (training=True) is kept, not silently dropped.
  fn = linen_loss_fn(model, apply_kwargs={"rngs": {"dropout": key}})
  got = fn(variables["params"], stochastic.keyed_batch(fn, b))
  ref = classification_losses(model.apply(variables, X, training=True, rngs={"dropout": key}), Y)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # An explicit flag in apply_kwargs wins.
  fn = linen_loss_fn(model, apply_kwargs={"training": False})
  np.testing.assert_allclose(
    fn(variables["params"], b), classification_losses(model.apply(variables, X), Y), rtol=1e-6
  )


def test_linen_batchnorm_and_dropout_running_stats_untouched_then_user_loop():
  class BNDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.Dropout(0.3, deterministic=not train)(x.mean(axis=(1, 2)))
      return nn.Dense(3)(x)

  model = BNDrop()
  variables = model.init(KEY, X)
  before = jax.tree_util.tree_map(np.array, variables["batch_stats"])
  loss_fn = linen_loss_fn(model, batch_stats=variables["batch_stats"])
  for run in (
    lambda: nio_jax.nio(loss_fn, variables["params"], [(X, Y)], {"num_steps": 2}),
    lambda: nio_jax.gradinit(loss_fn, variables["params"], [(X, Y)], {"num_steps": 2}),
    lambda: nio_jax.metainit(loss_fn, variables["params"], [(X, Y)], {"num_steps": 2}),
    lambda: nio_jax.lsuv(loss_fn, variables["params"], [(X, Y)]),
  ):
    result = run()
    chex.assert_trees_all_equal(variables["batch_stats"], before)
  v = {**variables, "params": result.params}

  @jax.jit
  def step(v, key):
    def loss(p):
      out, upd = model.apply(
        {**v, "params": p}, X, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
      )
      return classification_losses(out, Y).mean(), upd

    (value, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    p = jax.tree_util.tree_map(lambda a, b: a - 0.01 * b, v["params"], g)
    return {**v, "params": p, **upd}, value

  v, value = step(v, KEY)
  assert np.isfinite(float(value))


# ------------------------------------------------------------------ batches


@pytest.mark.parametrize(
  ("batch", "kwargs"),
  [
    ((X, Y), {}),
    ([X, Y], {}),
    ({"x": X, "y": Y}, {}),
    ({"pixels": X, "cls": Y}, {"inputs": "pixels", "labels": "cls"}),
    ({"a": {"img": X}, "t": Y}, {"inputs": lambda b: b["a"]["img"], "labels": "t"}),
  ],
)
def test_any_batch_structure(batch, kwargs):
  model = LinenNet()
  variables = model.init(KEY, X)
  fn = linen_loss_fn(model, dropout=False, **kwargs)
  # Dropout off and no batch norm: training mode gives the evaluation outputs.
  ref = classification_losses(model.apply(variables, X), Y)
  np.testing.assert_allclose(fn(variables["params"], batch), ref, rtol=1e-6)


def test_missing_labels_name_the_fix():
  model = LinenNet()
  variables = model.init(KEY, X)
  fn = linen_loss_fn(model, dropout=False)
  with pytest.raises(KeyError, match="labels="):
    fn(variables["params"], {"image": X, "cls": Y})
  with pytest.raises(KeyError, match="inputs="):
    fn(variables["params"], {"pixels": X, "label": Y})
  with pytest.raises(KeyError, match=r"inputs='pixels'"):
    linen_loss_fn(model, dropout=False, inputs="pixels", labels="cls")(
      variables["params"], {"image": X, "label": Y}
    )
  # forward needs only the inputs.
  out = fn.forward(variables["params"], X)
  assert out.shape == (8, 3)


def test_adapter_arguments_checked():
  with pytest.raises(ValueError, match="dropout="):
    linen_loss_fn(LinenNet(), dropout="yes")
  with pytest.raises(TypeError, match="flax.linen.Module"):
    linen_loss_fn(NNXNet(nnx.Rngs(0)))
  with pytest.raises(TypeError, match="nnx.Module"):
    nnx_loss_fn(LinenNet())


# ------------------------------------------------------------------ keys


def test_keyed_batches_fresh_per_batch_and_cycle_and_identity_when_deterministic():
  fn = lambda p, b: b[0].sum(axis=(1, 2, 3))
  batches = [(X, Y), (X, Y)]
  assert stochastic.keyed_batches(fn, batches) is batches
  fn.rng_seed = 3
  keyed = stochastic.keyed_batches(fn, batches)
  assert len(keyed) == 2
  first_pass = [kb.keys for kb in keyed]
  second_pass = [kb.keys for kb in keyed]
  seen = {np.asarray(k).tobytes() for k in first_pass + second_pass}
  assert len(seen) == 4  # a new key for every batch drawn, across passes
  for kb in keyed:
    assert kb.keys.shape == (8, 2) and kb.keys.dtype == np.uint32
    chex.assert_trees_all_equal(kb.data, (X, Y))  # the user's data unchanged
  # Reproducible from the seed; an iterator stays an iterator.
  it = stochastic.keyed_batches(fn, iter(batches))
  np.testing.assert_array_equal(next(it).keys, stochastic.example_keys(3, 0, 8))
  fn.rng_seed = 1.5
  with pytest.raises(TypeError, match="rng_seed"):
    stochastic.keyed_batches(fn, batches)


def test_per_example_gradients_with_dropout_equal_a_loop_of_grads():
  """Each per-example gradient sees its own key: brute force over one-example batches."""
  model = NNXDropoutOnly(nnx.Rngs(0))
  loss_fn, params = nnx_loss_fn(model)
  kb = stochastic.keyed_batch(loss_fn, (X, Y), 5)
  grads = nio_jax.per_example_grads(loss_fn, params, kb)
  for i in range(3):
    one = jax.tree_util.tree_map(lambda a: a[i : i + 1], kb)
    ref = jax.grad(lambda p: loss_fn(p, one).sum())(params)
    chex.assert_trees_all_close(
      jax.tree_util.tree_map(lambda g: g[i], grads), ref, rtol=1e-5, atol=1e-6
    )
  # Different examples draw different masks: with one shared key, examples 0 and 1 (same
  # input) would get identical gradients.
  same = jax.tree_util.tree_map(lambda a: jnp.stack([a[0], a[0]]), kb)
  g2 = nio_jax.per_example_grads(loss_fn, params, same._replace(keys=kb.keys[:2]))
  assert not np.allclose(g2["l1"]["kernel"][0], g2["l1"]["kernel"][1])


def test_measure_with_dropout_varies_per_batch_drawn_and_not_without():
  model = NNXDropoutOnly(nnx.Rngs(0))
  on, params = nnx_loss_fn(model)
  off, _ = nnx_loss_fn(model, dropout=False)
  m_on = nio_jax.measure(on, params, [(X, Y)], num_batches=3)
  m_off = nio_jax.measure(off, params, [(X, Y)], num_batches=3)
  assert m_on["gc_std"] > 0
  assert m_off["gc_std"] == 0


# ------------------------------------------------------------------ NNX transforms, attention


class Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    return x + self.drop(nnx.relu(self.bn(self.lin(x))))


class ScannedNet(nnx.Module):
  """Flax's scan-over-layers pattern: blocks made by nnx.vmap, applied by nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.inp = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.inp(x), self.blocks))


class AttentionNet(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(20, 16, rngs=rngs)
    self.att = nnx.MultiHeadAttention(
      num_heads=2, in_features=16, dropout_rate=0.1, decode=False, rngs=rngs
    )
    self.ln = nnx.LayerNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, tokens):
    h = self.emb(tokens)
    return self.head(self.ln(h + self.att(h)).mean(axis=1))


def test_nnx_scanned_blocks_with_batchnorm_and_dropout():
  model = ScannedNet(nnx.Rngs(0))
  stats = _state(model, nnx.BatchStat)
  loss_fn, params = nnx_loss_fn(model)
  x = jax.random.normal(KEY, (8, 4))
  b = (x, Y)
  # One key per stacked layer: the three blocks draw different masks.
  on = loss_fn(params, stochastic.keyed_batch(loss_fn, b, 0))
  assert not np.allclose(on, loss_fn(params, stochastic.keyed_batch(loss_fn, b, 1)))
  result = nio_jax.nio(loss_fn, params, [b], {"num_steps": 2, "num_chunks": 2})
  assert np.all(np.isfinite(result.history["gc"]))
  chex.assert_trees_all_equal(_state(model, nnx.BatchStat), stats)
  # LSUV cannot walk a scan: a clear error naming the fix.
  with pytest.raises(ValueError, match="scan"):
    nio_jax.lsuv(loss_fn, params, [b])


def test_nnx_attention_with_dropout_sample_wise():
  model = AttentionNet(nnx.Rngs(0))
  loss_fn, params = nnx_loss_fn(model)
  tokens = jax.random.randint(KEY, (8, 5), 0, 20)
  result = nio_jax.nio(
    loss_fn, params, [(tokens, Y)], {"num_steps": 2, "num_chunks": None, "overlap": 0.0}
  )
  assert np.all(np.isfinite(result.history["gc"]))


class HandLinear(nnx.Module):
  """A hand-written layer holding `w` / `b`, as Flax's toy NNX examples do."""

  def __init__(self, din, dout, *, rngs):
    self.w = nnx.Param(jax.random.uniform(rngs.params(), (din, dout)))
    self.b = nnx.Param(jnp.zeros((dout,)))

  def __call__(self, x):
    return x @ self.w + self.b


class HandMLP(nnx.Module):
  def __init__(self, rngs):
    self.linear1 = HandLinear(2, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.linear2 = HandLinear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.gelu(self.drop(self.bn(self.linear1(x)))))


def test_hand_written_w_b_layers_are_linear_and_nio_runs():
  model = HandMLP(nnx.Rngs(0))
  loss_fn, params = nnx_loss_fn(model)
  kinds = nio_jax.leaves.leaf_kinds_for(loss_fn, params)
  assert kinds.kind(("linear1", "w")) == "kernel" and kinds.kind(("linear1", "b")) == "bias"
  x = jax.random.normal(KEY, (8, 2))
  result = nio_jax.nio(loss_fn, params, [(x, Y)], {"num_steps": 2, "num_chunks": 2})
  assert np.all(np.isfinite(result.history["gc"]))


def test_default_selection_finding_nothing_says_so_not_blaming_wrt():
  class OnlyEmbed(nnx.Module):
    def __init__(self, rngs):
      self.emb = nnx.Embed(20, 3, rngs=rngs)

    def __call__(self, t):
      return self.emb(t).mean(axis=1)

  loss_fn, params = nnx_loss_fn(OnlyEmbed(nnx.Rngs(0)))
  tokens = jax.random.randint(KEY, (8, 4), 0, 20)
  with pytest.raises(ValueError, match="default leaf selection.*grad_filter=None"):
    nio_jax.nio(loss_fn, params, [(tokens, Y)], {"num_steps": 1})
  # The fix it names works.
  nio_jax.nio(loss_fn, params, [(tokens, Y)], {"num_steps": 1, "grad_filter": None})
