"""Leaf classification by structure (`nio_jax.leaves`), checked against the module types.

The ground truth is each linen module's class, recorded with `nn.intercept_methods` while the
model is initialised (abstractly, `jax.eval_shape`): the classification itself never sees
module types, only the params and `batch_stats` trees that the Flax adapter hands over.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nio_jax
from nio_jax import leaves, models
from nio_jax.flax_utils import (
  linen_leaf_kinds,
  linen_loss_fn,
  nnx_leaf_kinds,
  nnx_loss_fn,
)
from nio_jax.models.nnx_models import NNXMLP

# The smallest model each registry constructor allows (the architecture is what matters).
SMALL = {
  "vgg19": dict(width_mult=0.0625),
  "vgg19_bn": dict(width_mult=0.0625),
  "densenet100": dict(depth=10, growth_rate=4),
  "wrn28_10": dict(depth=10, widen=1),
  "resnet50": dict(layers=(1, 1, 1, 1), width=4),
  "vit_tiny": dict(dim=16, depth=2, num_heads=2),
  "vit_mini": dict(dim=16, depth=2, num_heads=2),
  "swin_mini": dict(embed_dim=8, depths=(2, 2), num_heads=(2, 4), window=2),
  "mlp": dict(hidden=(8,)),
  "cnn_small": dict(channels=(4, 4), hidden=8),
}
INPUT = {"resnet50": (1, 32, 32, 3), "swin_mini": (1, 16, 16, 3)}
LINEAR = (nn.Conv, nn.Dense, nn.DenseGeneral)


def _cases():
  out = [(n, {}) for n in models.names()]
  out.append(("resnet20", dict(variant="fixup")))
  return out


def _init_with_types(name, extra):
  model = models.get(name, **{**SMALL.get(name, {}), **extra})
  shape = INPUT.get(name, (1, *models.input_shape(name)))
  seen = {}

  def record(f, args, kwargs, ctx):
    seen[tuple(ctx.module.path)] = type(ctx.module)
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
    )
  return model, variables, seen


def _expected_kind(names, leaf, module_type):
  bias = "bias" in names[-1]
  if issubclass(module_type, nn.BatchNorm):
    return leaves.BATCH_NORM_BIAS if bias else leaves.BATCH_NORM_SCALE
  if issubclass(module_type, nn.LayerNorm):
    return leaves.LAYER_NORM_BIAS if bias else leaves.LAYER_NORM_SCALE
  if issubclass(module_type, LINEAR):
    return leaves.KERNEL if names[-1] == "kernel" else leaves.BIAS
  stacked = any(n.endswith("_scan") for n in names)
  size = int(np.prod(leaf.shape[1:] if stacked else leaf.shape))
  return leaves.SCALAR if size == 1 else leaves.OTHER


@pytest.mark.parametrize("name,extra", _cases(), ids=lambda c: str(c) if c else "")
def test_registry_leaf_kinds_follow_module_types(name, extra):
  """Every registry model: each leaf's kind is what its module's class says, and the leaves
  that enter GradCosine by default are exactly the conv/dense/layer-norm leaves."""
  model, variables, seen = _init_with_types(name, extra)
  params = variables["params"]
  kinds = linen_leaf_kinds(variables)
  loss_fn = linen_loss_fn(model, batch_stats=variables.get("batch_stats"))
  gc_filter = leaves.resolve_grad_filter("default", loss_fn, params)
  in_gc, expected_gc = set(), set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = leaves.path_names(path)
    module_type = seen[names[:-1]]
    assert kinds.kind(path) == _expected_kind(names, leaf, module_type), names
    if gc_filter(path, leaf):
      in_gc.add(names)
    if issubclass(module_type, (*LINEAR, nn.LayerNorm)):
      expected_gc.add(names)
  assert in_gc == expected_gc
  # The default of the searches: "default" and nio_jax.default_grad_filter resolve alike.
  same = leaves.resolve_grad_filter(nio_jax.default_grad_filter, loss_fn, params)
  assert same == gc_filter


def test_densenet_and_vit_share_names_but_not_kinds():
  """DenseNet's `norm1`/`norm2` are batch norm, ViT's are layer norm: same names, and the
  name rule (the fallback without structure) can only get one of them right."""
  _, dn, _ = _init_with_types("densenet100", {})
  _, vit, _ = _init_with_types("vit_mini", {})
  dk, vk = linen_leaf_kinds(dn), linen_leaf_kinds(vit)
  assert dk.kind(("block1_layer1", "norm1", "scale")) == leaves.BATCH_NORM_SCALE
  assert vk.kind(("encoder_block0", "norm1", "scale")) == leaves.LAYER_NORM_SCALE
  assert not dk.grad_filter(("block1_layer1", "norm1", "scale"))
  assert vk.grad_filter(("encoder_block0", "norm1", "scale"))
  # Without the batch_stats the two are indistinguishable: both read as layer norm.
  bare = leaves.classify(dn["params"])
  assert bare.kind(("block1_layer1", "norm1", "scale")) == leaves.LAYER_NORM_SCALE


class DenseNetLike(nn.Module):
  """DenseNet's names on a tiny net: batch norms called `norm1` and `norm_final`."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv0")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm1")(x))
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="norm_final")(x)
    return nn.Dense(3, name="classifier")(jnp.mean(nn.relu(x), (1, 2)))


def test_search_gc_excludes_batchnorm_named_norm():
  """The GC that `measure` and the NIO search report takes no batch-norm leaf, also where
  the batch norms are named like DenseNet's (`norm1`, `norm_final`: the old name rule let
  them in). The registry models are covered structurally above."""
  model = DenseNetLike()
  key = jax.random.PRNGKey(0)
  batch = {"image": jax.random.normal(key, (4, 6, 6, 2)), "label": jnp.arange(4) % 3}
  variables = model.init(key, batch["image"])
  params = variables["params"]
  loss_fn = linen_loss_fn(model, batch_stats=variables["batch_stats"])
  conv_dense = lambda p, x: leaves.path_names(p)[0] in ("conv0", "conv1", "classifier")
  kw = dict(num_batches=1, num_chunks=2, overlap=0.0, pullback="loop", conv="none")
  got = nio_jax.measure(loss_fn, params, [batch], **kw)
  want = nio_jax.measure(loss_fn, params, [batch], wrt=conv_dense, **kw)
  with_bn = nio_jax.measure(loss_fn, params, [batch], wrt=None, **kw)
  np.testing.assert_allclose(got["gc"], want["gc"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  assert abs(got["grad_norm"] - with_bn["grad_norm"]) > 1e-3 * with_bn["grad_norm"]
  cfg = dict(num_steps=1, num_chunks=2, overlap=0.0, pullback="loop", conv="none")
  res = nio_jax.nio(loss_fn, params, [batch], cfg)
  np.testing.assert_allclose(res.history["gc"][0], want["gc"], rtol=1e-5)
  # The experiment's training-mode loss (`experiment.init_loss_fn`) hands over the same
  # structure.
  train_loss = linen_loss_fn(
    model, batch_stats=variables["batch_stats"], apply_kwargs={"train": True}
  )
  assert train_loss.module_kinds == {("norm1",): "batch_norm", ("norm_final",): "batch_norm"}
  np.testing.assert_allclose(res.history["grad_norm"][0], want["grad_norm"], rtol=1e-5)


def test_nnx_kinds_by_module_type():
  """NNX: the module type decides (a BatchNorm named `norm1` is batch norm, a LayerNorm
  named `bn` is layer norm), and NNX biases are biases despite the `.value` path key."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.norm1 = nnx.BatchNorm(4, rngs=rngs)
      self.bn = nnx.LayerNorm(4, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, train=False):
      x = self.bn(self.norm1(self.conv(x)))
      return self.head(x.mean((1, 2)))

  net = Net(nnx.Rngs(0))
  kinds = nnx_leaf_kinds(net)
  got = dict(kinds.items())
  assert got == {
    "bn/bias": leaves.LAYER_NORM_BIAS,
    "bn/scale": leaves.LAYER_NORM_SCALE,
    "conv/bias": leaves.BIAS,
    "conv/kernel": leaves.KERNEL,
    "head/bias": leaves.BIAS,
    "head/kernel": leaves.KERNEL,
    "norm1/bias": leaves.BATCH_NORM_BIAS,
    "norm1/scale": leaves.BATCH_NORM_SCALE,
  }
  loss_fn, params = nnx_loss_fn(net)
  flt = leaves.resolve_grad_filter("default", loss_fn, params)
  chosen = {"/".join(leaves.path_names(p)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  chosen = {n for n in chosen if flt(tuple(n.split("/")))}
  assert chosen == {n for n, k in got.items() if k in leaves.GRAD_KINDS}
  _, spec = nio_jax.init_scales(params, kinds=kinds)
  bounds = {"/".join(leaves.path_names(p)): float(b) for p, b in _items(spec.min_scale)}
  assert bounds == {n: (0.0 if n.endswith("bias") else float(np.float32(0.01))) for n in got}


def _items(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def test_nnx_bias_bound_without_adapter():
  """`init_scales` on an NNX `State` alone: biases get `min_scale_bias` (the path ends in
  `.value`, which is not the leaf's name)."""
  model = NNXMLP(4, (3,), 2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  _, spec = nio_jax.init_scales(params, min_scale=0.01, min_scale_bias=0.0)
  for path, b in _items(spec.min_scale):
    want = 0.0 if leaves.leaf_name(path) == "bias" else float(np.float32(0.01))
    assert float(b) == want, path


def test_leaf_kinds_errors_and_hash():
  kinds = leaves.classify({"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
  with pytest.raises(ValueError, match="not in the classified params tree"):
    kinds.kind(("Dense_1", "kernel"))
  with pytest.raises(ValueError, match="unknown module kind"):
    leaves.classify({"a": {"w": jnp.ones(2)}}, {("a",): "conv"})
  again = leaves.classify({"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
  assert kinds == again and hash(kinds) == hash(again)
  assert kinds.grad_filter == again.grad_filter  # a stable static argument for jit
  chex.assert_trees_all_equal(jax.tree_util.tree_leaves(kinds), [])


# ----------------------------------------------------------------------------------------
# linen and NNX twins: the same search gives the same scales


class LinenTwin(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    normal = nn.initializers.normal(1.0)
    x = nn.Dense(6, bias_init=normal, name="dense0")(x)
    x = nn.LayerNorm(bias_init=normal, name="ln")(x)
    return nn.Dense(3, bias_init=normal, name="head")(jnp.tanh(x))


class NNXTwin(nnx.Module):
  def __init__(self, rngs):
    self.dense0 = nnx.Linear(4, 6, rngs=rngs)
    self.ln = nnx.LayerNorm(6, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self.head(jnp.tanh(self.ln(self.dense0(x))))


def _twins():
  key = jax.random.PRNGKey(3)
  x = jax.random.normal(key, (16, 4))
  batches = [
    {"image": x[:8], "label": jnp.arange(8) % 3},
    {"image": x[8:], "label": (jnp.arange(8) + 1) % 3},
  ]
  linen = LinenTwin()
  lp = linen.init(key, x)["params"]
  net = NNXTwin(nnx.Rngs(0))
  state = nnx.state(net, nnx.Param)
  copied = jax.tree_util.tree_map_with_path(
    lambda p, _: lp[leaves.path_names(p)[0]][leaves.path_names(p)[1]], state
  )
  nnx.update(net, copied)
  l_loss = linen_loss_fn(linen)
  n_loss, n_params = nnx_loss_fn(net)
  np.testing.assert_allclose(l_loss(lp, batches[0]), n_loss(n_params, batches[0]), rtol=1e-6)
  return (l_loss, lp), (n_loss, n_params), batches


def _by_name(scales):
  return {"/".join(leaves.path_names(p)): np.asarray(s) for p, s in _items(scales)}


def test_linen_and_nnx_twins_nio_scales_equal():
  """NIO on a linen model and its NNX twin: equal scales, including biases pushed to their
  floor (0 for biases, the NNX `.value` path once gave them the weights' 0.01)."""
  (l_loss, lp), (n_loss, n_params), batches = _twins()
  cfg = dict(
    num_steps=4, num_chunks=2, overlap=0.0, lr=0.5, gamma=1e6, pullback="loop", conv="none"
  )
  a = _by_name(nio_jax.nio(l_loss, lp, batches, cfg).scales)
  b = _by_name(nio_jax.nio(n_loss, n_params, batches, cfg).scales)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert min(float(v) for k, v in a.items() if k.endswith("bias")) < 0.01  # the floor mattered


def test_linen_and_nnx_twins_gradinit_scales_equal():
  """GradInit with the layer-norm cap: the NNX layer-norm bias is a bias (floor 0, never
  capped) and its scale a layer-norm weight (capped), as in linen: equal scales."""
  (l_loss, lp), (n_loss, n_params), batches = _twins()
  cfg = dict(num_steps=4, lr=0.5, eta=1.0, gamma=1e6, batch_size=None, layernorm_max_scale=1.02)
  a = _by_name(nio_jax.gradinit(l_loss, lp, batches, cfg).scales)
  b = _by_name(nio_jax.gradinit(n_loss, n_params, batches, cfg).scales)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(float(a["ln/scale"]), 1.02, rtol=1e-6)  # the cap bound
  assert float(a["ln/bias"]) < 0.01  # the bias floor mattered (NNX once got 0.01)
  assert max(float(a[k]) for k in a if k.endswith("bias")) > 1.02  # biases are not capped


def test_gradinit_and_metainit_resolve_default_grad_filter_by_structure():
  """`grad_filter=nio_jax.default_grad_filter` means the structural GC leaves in GradInit and
  MetaInit too (not the bare name rule, which would let DenseNet-named batch norms in)."""
  model = DenseNetLike()
  key = jax.random.PRNGKey(0)
  batch = {"image": jax.random.normal(key, (4, 6, 6, 2)), "label": jnp.arange(4) % 3}
  variables = model.init(key, batch["image"])
  params = variables["params"]
  loss_fn = linen_loss_fn(model, batch_stats=variables["batch_stats"])
  conv_dense = lambda p, x: leaves.path_names(p)[0] in ("conv0", "conv1", "classifier")
  gq = nio_jax.methods.gradient_quotient
  a = gq(loss_fn, params, batch, grad_filter=nio_jax.default_grad_filter)
  b = gq(loss_fn, params, batch, grad_filter=conv_dense)
  c = gq(loss_fn, params, batch, grad_filter=None)
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
  assert abs(float(a[1]["grad_norm"]) - float(c[1]["grad_norm"])) > 1e-4
  cfg = dict(num_steps=1, batch_size=None, gamma=1e6)
  r1 = nio_jax.gradinit(
    loss_fn, params, [batch], {**cfg, "grad_filter": nio_jax.default_grad_filter}
  )
  r2 = nio_jax.gradinit(loss_fn, params, [batch], {**cfg, "grad_filter": conv_dense})
  np.testing.assert_allclose(r1.history["grad_norm"], r2.history["grad_norm"], rtol=1e-6)
