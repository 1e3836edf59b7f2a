"""The common interface: registry, published defaults, determinism, and each search lowering
the objective it claims to optimise on a small MLP on real Fashion-MNIST data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from nio_jax.data import fashion_mnist
from nio_jax.methods import (
  GradInitConfig,
  MetaInitConfig,
  available_methods,
  get_method,
  initialize,
  register,
  unregister,
)
from tests import tiny_models as tm

N, B = 256, 64
SIZES = (49, 32, 10)
KNOWN = {"nio", "gradinit", "gradinit_adam", "metainit", "fixup", "kaiming", "lsuv"}


def load_fmnist(n):
  """The first n training images, 4×4 average-pooled to 7×7 (49 features), standardised.

  Found where the library looks (`$NIO_JAX_DATA`, /usr/share/datasets/fashion-mnist,
  ~/.cache/nio_jax/fashion_mnist); raises FileNotFoundError when absent."""
  d = fashion_mnist.find_fashion_mnist_dir()
  x = fashion_mnist.read_idx(d / "train-images-idx3-ubyte.gz")[:n].reshape(n, 7, 4, 7, 4)
  y = fashion_mnist.read_idx(d / "train-labels-idx1-ubyte.gz")[:n]
  x = x.astype(np.float32).mean(axis=(2, 4)).reshape(n, 49)
  x = (x - x.mean()) / x.std()
  return x, y.astype(np.int32)


@pytest.fixture(scope="module")
def data():
  """Real Fashion-MNIST batches (for the tests that claim an objective is lowered on them)."""
  try:
    x, y = load_fmnist(N)
  except FileNotFoundError as e:
    pytest.skip(f"Fashion-MNIST not found: {e}")
  batches = [
    {"x": jnp.asarray(x[i : i + B]), "y": jnp.asarray(y[i : i + B])} for i in range(0, N, B)
  ]
  params = tm.mlp_params(jax.random.PRNGKey(0), SIZES, bias=0.0)
  return params, batches


@pytest.fixture(scope="module")
def toy():
  """Random batches of the same shapes: for the tests that need no real data."""
  batches = [
    tm.mlp_batch(jax.random.PRNGKey(i), b=B, d=SIZES[0], c=SIZES[-1]) for i in range(N // B)
  ]
  return tm.mlp_params(jax.random.PRNGKey(0), SIZES, bias=0.0), batches


def assert_identical(a, b):
  ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert ta == tb
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_lowered(values, k=4):
  v = np.asarray(values, np.float64)
  assert v[-k:].mean() < v[:k].mean(), v


# ------------------------------------------------------------------ registry


def test_registry_lists_methods():
  assert set(available_methods()) == KNOWN
  with pytest.raises(ValueError) as e:
    initialize("grad_init", tm.mlp_loss, {}, None)
  for name in KNOWN:
    assert repr(name) in str(e.value) or name in str(e.value)
  with pytest.raises(ValueError, match="unknown initialisation method"):
    get_method(None)


def test_register_one_new_method(toy):
  params, batches = toy

  @register("_test_identity")
  def ident(loss_fn, params, data, config=None, *, progress=False, mesh=None):
    return nio_jax.InitResult(
      params=params, scales=None, history={}, method="_test_identity", config=dict(config or {})
    )

  try:
    assert "_test_identity" in available_methods()
    res = initialize("_test_identity", tm.mlp_loss, params, batches, {"a": 1})
    assert res.config == {"a": 1} and res.params is params
    with pytest.raises(ValueError, match="already registered"):
      register("_test_identity")(lambda *a, **k: None)
  finally:
    unregister("_test_identity")


def test_published_defaults():
  g = GradInitConfig.create(None)
  assert (g.variant, g.eta, g.gamma, g.num_steps, g.lr, g.batch_size) == (
    "sgd",
    0.1,
    1.0,
    390,
    1e-3,
    128,
  )
  m = MetaInitConfig.create(None)
  assert (m.variant, m.learning_rate, m.momentum, m.num_steps, m.eps) == (
    "sign_momentum",
    0.1,
    0.9,
    500,
    1e-5,
  )
  assert MetaInitConfig.create(dict(variant="rescale_adam")).num_steps == 391
  n = nio_jax.NIOConfig.create(None)
  assert (n.num_steps, n.num_chunks, n.overlap, n.gamma, n.lr, n.objective) == (
    100,
    4,
    0.2,
    10.0,
    3e-3,
    "gc_gn_sqrt",
  )
  assert get_method("gradinit").config_cls is GradInitConfig
  assert get_method("metainit").config_cls is MetaInitConfig
  assert get_method("nio").config_cls is nio_jax.NIOConfig


@pytest.mark.parametrize(
  "method,bad,match",
  [
    ("gradinit", dict(gamma=0.0), "gamma"),
    ("gradinit", dict(eta=-1.0), "eta"),
    ("gradinit", dict(num_steps=0), "num_steps"),
    ("gradinit_adam", dict(gamma=-1.0), "gamma"),
    ("metainit", dict(num_steps=0), "num_steps"),
    ("nio", dict(gamma=0.0), "gamma"),
    ("kaiming", dict(lr=1.0), "unknown Kaiming config key"),
  ],
)
def test_bad_config_through_initialize(toy, method, bad, match):
  params, batches = toy
  with pytest.raises(ValueError, match=match):
    initialize(method, tm.mlp_loss, params, batches, bad)


def test_kaiming_is_identity(toy):
  params, batches = toy
  res = initialize("kaiming", tm.mlp_loss, params, batches)
  assert res.params is params and res.scales is None and res.history == {}
  assert res.method == "kaiming" and res.num_steps == 0
  assert_identical(initialize("kaiming", None, params, None).params, res.params)


def test_fixup_entry():
  """The registry entry applies nio_jax.methods.fixup's rules (a branch layout of
  nio_jax.models: L = 2 basic blocks, m = 2 convs each)."""
  from nio_jax.methods.fixup import fixup_rules

  k = jax.random.split(jax.random.PRNGKey(3), 6)
  block = lambda a, b: {
    "conv1": {"kernel": jax.random.normal(a, (3, 3, 2, 2))},
    "conv2": {"kernel": jax.random.normal(b, (3, 3, 2, 2))},
    "bias1a": jnp.zeros(()),
    "scale": jnp.ones(()),
  }
  params = {
    "conv0": {"kernel": jax.random.normal(k[0], (3, 3, 1, 2))},
    "stage1_block0": block(k[1], k[2]),
    "stage1_block1": block(k[3], k[4]),
    "fc": {"kernel": jax.random.normal(k[5], (2, 3)), "bias": jnp.ones(3)},
  }
  res = initialize("fixup", None, params, None)
  again = initialize("fixup", None, params, None)
  assert res.method == "fixup" and res.scales is None and res.history == {}
  assert_identical(res.params, again.params)
  assert_identical(res.params, fixup_rules(params))
  for b in ("stage1_block0", "stage1_block1"):
    assert not np.any(np.asarray(res.params[b]["conv2"]["kernel"]))
    np.testing.assert_allclose(
      res.params[b]["conv1"]["kernel"], params[b]["conv1"]["kernel"] * 2**-0.5, rtol=1e-6
    )
  assert not np.any(np.asarray(res.params["fc"]["kernel"]))
  assert_identical(res.params["conv0"], params["conv0"])


# ------------------------------------------------------------------ searches on real data


def test_gradinit_lowers_lookahead_loss_and_is_deterministic(data):
  params, batches = data
  cfg = dict(num_steps=16, gamma=1e6, lr=0.05, batch_size=None)  # objective steps only
  r1 = initialize("gradinit", tm.mlp_loss, params, batches, cfg)
  r2 = initialize("gradinit", tm.mlp_loss, params, batches, GradInitConfig.create(cfg))
  assert not r1.history["constraint"].any()
  assert_lowered(r1.history["objective"])
  assert_identical(r1.scales, r2.scales)
  assert_identical(r1.params, r2.params)
  assert_identical(r1.history, r2.history)
  assert_identical(r1.params, nio_jax.apply_scales(params, r1.scales))


def test_gradinit_constraint_lowers_grad_norm(data):
  """With γ below the gradient norm every step is a constraint step, which lowers gn."""
  params, batches = data
  res = initialize(
    "gradinit",
    tm.mlp_loss,
    params,
    batches,
    dict(num_steps=8, gamma=1e-3, lr=0.05, batch_size=None),
  )
  assert res.history["constraint"].all()
  assert_lowered(res.history["grad_norm"], k=2)


def test_metainit_lowers_gq_and_is_deterministic(data):
  params, batches = data
  cfg = dict(num_steps=20)  # paper lr 0.1, momentum 0.9
  r1 = initialize("metainit", tm.mlp_loss, params, batches[:1], cfg)
  r2 = initialize("metainit", tm.mlp_loss, params, batches[:1], cfg)
  assert_lowered(r1.history["gq"], k=5)
  assert_identical(r1.scales, r2.scales)
  assert_identical(r1.params, r2.params)


def test_nio_lowers_objective_and_wrapper_is_deterministic(data):
  params, batches = data
  cfg = dict(num_steps=12, num_chunks=4, overlap=0.0, gamma=1e6, lr=0.05)
  r1 = initialize("nio", tm.mlp_loss, params, batches, cfg)
  r2 = nio_jax.nio(tm.mlp_loss, params, batches, cfg)
  assert_lowered(r1.history["objective"])
  assert_identical(r1.scales, r2.scales)
  assert_identical(r1.params, r2.params)
  assert r1.method == "nio"


def test_adam_and_random_input_runs_are_deterministic(data):
  params, batches = data
  cfg = dict(num_steps=2)  # the IWSLT recipe: thirds look-ahead, one batch per step
  a1 = initialize("gradinit_adam", tm.mlp_loss, params, iter(batches[:2]), cfg)
  a2 = initialize("gradinit_adam", tm.mlp_loss, params, batches, cfg)
  assert_identical(a1.scales, a2.scales)
  assert_identical(a1.history, a2.history)
  assert a1.method == "gradinit_adam" and a1.history["objective"].shape == (2,)
  assert (a1.config["variant"], a1.config["eta"], a1.config["gamma"], a1.config["lookahead"]) == (
    "adam",
    1e-3,
    1000.0,
    "thirds",
  )
  spec = {"x": (8, SIZES[0]), "num_classes": SIZES[-1], "label_key": "y"}
  m1 = initialize("metainit", tm.mlp_loss, params, spec, dict(num_steps=3, seed=7))
  m2 = initialize("metainit", tm.mlp_loss, params, spec, dict(num_steps=3, seed=7))
  assert_identical(m1.scales, m2.scales)
  assert_identical(m1.history, m2.history)
