"""Model zoo: registry, shapes (eval_shape, no compile), scan conventions, scanned == unrolled,
initialisation statistics, NNX models."""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nio_jax import models

SCAN_RE = re.compile(r"(^|_)scan$")


def key(seed=0):
  """RBG keys: a jitted init compiles ~3x faster than with threefry (matters on 2 CPU cores)."""
  return jax.random.key(seed, impl="rbg")


def random_variables(model, x, seed=0):
  """Variables with the model's structure filled with random values (no init compile):
  He-like kernels, perturbed BN/LN affine and running stats, small biases."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = np.random.RandomState(seed)

  def fill(path, s):
    leaf, shape = _path_keys(path)[-1], s.shape
    if leaf == "kernel":
      fan_in = shape[-2] if len(shape) in (2, 3) else math.prod(shape[-4:-1])
      v = rng.randn(*shape) * math.sqrt(2.0 / fan_in)
    elif leaf == "var":
      v = 0.5 + rng.rand(*shape)
    elif leaf == "scale":
      v = 1.0 + 0.2 * rng.randn(*shape)
    else:  # bias, mean, scalar Fixup biases, pos_embed, cls_token
      v = 0.1 * rng.randn(*shape)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _path_keys(path):
  return [str(getattr(p, "key", p)) for p in path]


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------


def test_registry_names_and_errors():
  names = models.names()
  for n in [
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet1202",
    "vgg19",
    "vgg19_bn",
    "densenet100",
    "wrn28_10",
    "resnet50",
    "vit_tiny",
    "vit_mini",
    "mlp",
    "cnn_small",
  ]:
    assert n in names
  with pytest.raises(ValueError, match="resnet110"):
    models.get("resnet111")
  with pytest.raises(ValueError, match="known models"):
    models.input_shape("nope")
  m = models.get("resnet110", norm="none", num_classes=100)
  assert (m.depth, m.norm, m.num_classes) == (110, "none", 100)
  assert models.get("vgg19").norm == "none" and models.get("vgg19_bn").norm == "bn"
  with pytest.raises(ValueError):
    models.get("resnet20", variant="fixup", norm="bn").init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3))
    )


@pytest.mark.parametrize("name", models.names())
def test_shapes_and_scan_convention(name):
  model = models.get(name, num_classes=7)
  x = jax.ShapeDtypeStruct((2,) + models.input_shape(name), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out.shape == (2, 7) and out.dtype == jnp.float32
  if "batch_stats" in variables:
    out2, upd = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert out2.shape == (2, 7)
    chex.assert_trees_all_equal_shapes(upd["batch_stats"], variables["batch_stats"])
  # scanned leaves: leading axis = number of scanned blocks, same for every leaf of a stack
  for coll in variables.values():
    stacks = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(coll)[0]:
      keys = _path_keys(path)
      hits = [k for k in keys if SCAN_RE.search(k)]
      if hits:
        stacks.setdefault(tuple(keys[: keys.index(hits[0]) + 1]), set()).add(leaf.shape[0])
    for key, lead in stacks.items():
      assert len(lead) == 1, (key, lead)
  n_params = models.count_params(variables["params"])
  assert n_params > 0


def test_resnet_scan_lengths():
  model = models.get("resnet110")
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  for s in (1, 2, 3):
    assert v["params"][f"stage{s}_scan"]["conv1"]["kernel"].shape[0] == 17
    assert v["batch_stats"][f"stage{s}_scan"]["bn1"]["mean"].shape[0] == 17
  # standard count of ResNet-110 (+ the reference's shortcut BNs: 2*(16+32) params)
  assert models.count_params(v["params"]) == 1_728_058


# ------------------------------------------------------------------------------------------
# scanned == unrolled
# ------------------------------------------------------------------------------------------

SCAN_CASES = [
  ("resnet20", dict(depth=14, width=4), (8, 8, 3)),
  ("resnet20", dict(depth=14, width=4, variant="fixup"), (8, 8, 3)),
  ("vit_mini", dict(dim=16, depth=3, num_heads=2), (8, 8, 3)),
  pytest.param("resnet20", dict(depth=14, width=4, norm="none"), (8, 8, 3), marks=pytest.mark.slow),
  pytest.param("wrn28_10", dict(depth=16, widen=1), (8, 8, 3), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
  "name,kwargs,shape", SCAN_CASES, ids=["resnet-bn", "resnet-fixup", "vit", "resnet-none", "wrn"]
)
def test_scanned_equals_unrolled(name, kwargs, shape):
  scanned = models.get(name, **kwargs, scan=True)
  unrolled = models.get(name, **kwargs, scan=False)
  x = jnp.asarray(np.random.RandomState(0).randn(4, *shape), jnp.float32)
  labels = jnp.arange(4) % 10
  v_s = random_variables(scanned, x)
  v_u = models.unstack_blocks(v_s)
  # layouts convert both ways
  chex.assert_trees_all_equal(models.stack_blocks(v_u), v_s)
  assert any(SCAN_RE.search(k) for k in v_s["params"])
  assert not any(SCAN_RE.search(k) for k in v_u["params"])
  has_bn = "batch_stats" in v_s

  def make_loss(model):
    def loss(params, rest):
      if has_bn:
        logits, upd = model.apply(
          {"params": params, **rest}, x, train=True, mutable=["batch_stats"]
        )
      else:
        logits, upd = model.apply({"params": params, **rest}, x, train=True), {}
      ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
      return ce, (logits, upd)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  rest_s = {k: v for k, v in v_s.items() if k != "params"}
  rest_u = {k: v for k, v in v_u.items() if k != "params"}
  (l_s, (y_s, upd_s)), g_s = make_loss(scanned)(v_s["params"], rest_s)
  (l_u, (y_u, upd_u)), g_u = make_loss(unrolled)(v_u["params"], rest_u)
  np.testing.assert_allclose(y_s, y_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(models.unstack_blocks(g_s), g_u, rtol=1e-4, atol=1e-5)
  if has_bn:
    chex.assert_trees_all_close(models.unstack_blocks(upd_s), upd_u, rtol=1e-5, atol=1e-6)


def test_stack_unstack_roundtrip_names():
  tree = {
    "a_block0": {"w": jnp.zeros(2)},
    "a_scan": {"w": jnp.arange(6.0).reshape(3, 2)},
    "fc": {"b": 1.0},
  }
  un = models.unstack_blocks(tree)
  assert sorted(un) == ["a_block0", "a_block1", "a_block2", "a_block3", "fc"]
  np.testing.assert_array_equal(un["a_block3"]["w"], [4.0, 5.0])
  chex.assert_trees_all_equal(models.stack_blocks(un), tree)


# ------------------------------------------------------------------------------------------
# initialisation statistics (the documented He variants)
# ------------------------------------------------------------------------------------------


def _std(a):
  return float(np.std(np.asarray(a)))


def test_init_resnet_he_fan_out_and_pytorch_linear():
  model = models.get("resnet20", norm="none")
  v = jax.jit(model.init)(key(), jnp.zeros((1, 8, 8, 3)))["params"]
  k = v["stage3_scan"]["conv1"]["kernel"]  # (2, 3, 3, 64, 64)
  assert abs(_std(k) / math.sqrt(2 / (9 * 64)) - 1) < 0.05
  assert float(jnp.max(jnp.abs(v["stage3_scan"]["conv1"]["bias"]))) == 0.0
  fc = np.asarray(v["fc"]["kernel"])
  assert np.abs(fc).max() <= 1 / math.sqrt(64) and abs(_std(fc) / (1 / math.sqrt(3 * 64)) - 1) < 0.2
  assert float(jnp.max(jnp.abs(v["fc"]["bias"]))) == 0.0
  # blocks of a scan get independent draws
  assert not np.allclose(k[0], k[1])


def test_init_vgg_wrn_vit():
  vgg = models.get("vgg19_bn", width_mult=0.25)
  v = jax.jit(vgg.init)(key(), jnp.zeros((1, 32, 32, 3)))["params"]
  assert abs(_std(v["conv15"]["kernel"]) / math.sqrt(2 / (9 * 128)) - 1) < 0.05
  assert abs(_std(v["classifier"]["kernel"]) / 0.01 - 1) < 0.2
  assert float(jnp.max(jnp.abs(v["conv0"]["bias"]))) == 0.0

  wrn = models.get("wrn28_10", depth=10, widen=2)
  v = jax.jit(wrn.init)(key(), jnp.zeros((1, 8, 8, 3)))["params"]
  k = np.asarray(v["stage3_block0"]["conv2"]["kernel"])  # 3x3x128x128
  bound = 1 / math.sqrt(9 * 128)
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
  assert float(jnp.max(jnp.abs(v["stage3_block0"]["conv2"]["bias"]))) == 0.0
  assert float(jnp.max(jnp.abs(v["linear"]["bias"]))) > 0.0  # PyTorch default bias

  vit = models.get("vit_mini", dim=64, depth=2, num_heads=2)
  v = jax.jit(vit.init)(key(), jnp.zeros((1, 16, 16, 3)))["params"]
  assert abs(_std(v["encoder_scan"]["mlp"]["fc1"]["kernel"]) / 0.02 - 1) < 0.05
  assert float(jnp.max(jnp.abs(v["encoder_scan"]["attn"]["qkv"]["bias"]))) == 0.0


def test_batch_stats_update_only_in_train():
  model = models.get("resnet20", depth=8, width=4)
  x = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 3) + 1.0, jnp.float32)
  v = random_variables(model, x)
  _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
  # eval mode needs no mutable collection
  jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)


# ------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------


def test_nnx_models_match_linen_and_train():
  from flax import nnx

  from nio_jax.models.nnx_models import NNXMLP, NNXSmallCNN

  x = jnp.asarray(np.random.RandomState(0).randn(3, 28, 28, 1), jnp.float32)
  for nnx_model, linen_model in [
    (NNXMLP(784, (16, 8), rngs=nnx.Rngs(0)), models.get("mlp", hidden=(16, 8))),
    (
      NNXSmallCNN(channels=(4, 8), hidden=16, rngs=nnx.Rngs(0)),
      models.get("cnn_small", channels=(4, 8), hidden=16),
    ),
  ]:
    graphdef, params = nnx.split(nnx_model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    linen_shapes = jax.eval_shape(lambda: linen_model.init(jax.random.key(0), x))["params"]
    chex.assert_trees_all_equal_shapes(pure, linen_shapes)
    np.testing.assert_allclose(
      jax.jit(lambda p: nnx.merge(graphdef, p)(x))(params),
      jax.jit(linen_model.apply)({"params": pure}, x),
      rtol=1e-5,
      atol=1e-5,
    )

    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    g = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(g))


def test_mlp_he_normal_init():
  """MLP(dense_init="he_normal"): kernels N(0, 2/fan_in), zero biases (the torch default is
  U(+-1/sqrt(fan_in)), variance 1/(3 fan_in), with non-zero biases)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from nio_jax import models

  m = models.get("mlp", hidden=(512, 512), dense_init="he_normal")
  p = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  k = np.asarray(p["dense1"]["kernel"])
  np.testing.assert_allclose(k.var(), 2.0 / 512, rtol=0.05)
  assert not np.any(np.asarray(p["dense1"]["bias"]))
  t = models.get("mlp", hidden=(512, 512)).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  np.testing.assert_allclose(np.asarray(t["params"]["dense1"]["kernel"]).var(), 1 / 1536, rtol=0.05)
