"""LSUV (`nio_jax.methods.lsuv`): unit output variance per layer, layer order from the
execution, the `lsuv` 0.3.0 package on PyTorch twins, batch norm, scanned layouts, bad input."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from nio_jax import models
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.methods import (
  LSUVConfig,
  available_methods,
  get_method,
  initialize,
  lsuv,
  lsuv_layers,
)
from nio_jax.scales import apply_scales
from tests import tiny_models as tm

B = 32


class MLP(nn.Module):
  """Dense layers named so that their sorted order is not the execution order."""

  names: tuple = ("z_first", "a_second", "m_third")
  features: tuple = (16, 12, 5)
  act: str = "tanh"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for i, (name, f) in enumerate(zip(self.names, self.features)):
      x = nn.Dense(f, name=name)(x)
      if i < len(self.names) - 1:
        x = getattr(nn, self.act)(x)
    return x


class CNN(nn.Module):
  """Strided, padded conv -> conv -> dense; optional batch norm after each conv."""

  bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2, padding=1, use_bias=not self.bn, name="conv_b")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, name="bn_b")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), padding=1, use_bias=not self.bn, name="conv_a")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, name="bn_a")(x)
    x = jnp.tanh(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3, name="head")(x)


def batch_of(key, shape, classes=3, b=B):
  k1, k2 = jax.random.split(key)
  return {
    "image": jax.random.normal(k1, (b, *shape)),
    "label": jax.random.randint(k2, (b,), 0, classes),
  }


def scaled(params, factor):
  """Every kernel multiplied by `factor` (so that LSUV has work to do)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: x * factor if p[-1].key == "kernel" else x, params
  )


def layer_stds(model, variables, x, **kwargs):
  """{module name: std (ddof=1) of its output}, from flax's own intercepted calls."""
  _, state = model.apply(
    variables, x, capture_intermediates=True, mutable=["intermediates", "batch_stats"], **kwargs
  )
  inter = state["intermediates"]
  return {
    name: float(jnp.std(v["__call__"][0], ddof=1))
    for name, v in inter.items()
    if name != "__call__" and not name.startswith("bn")
  }


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  batch = batch_of(jax.random.PRNGKey(1), (7,), classes=5)
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  return model, scaled(params, 3.0), batch


@pytest.fixture(scope="module")
def cnn():
  model = CNN()
  batch = batch_of(jax.random.PRNGKey(2), (8, 8, 2))
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  return model, scaled(params, 0.3), batch


# ------------------------------------------------------------------ unit variance, order


def test_name_order_would_fail(mlp, monkeypatch):
  """The same loop over the layers in parameter-name order leaves the later layers off
  target: the execution order matters, and is what `lsuv` uses."""
  module = sys.modules["nio_jax.methods.lsuv"]
  find = module._find_layers
  model, params, batch = mlp
  loss = linen_loss_fn(model)
  monkeypatch.setattr(
    module, "_find_layers", lambda *a: (find(*a)[0], sorted(find(*a)[1], key=lambda l: l.kernel))
  )
  res = initialize("lsuv", loss, params, [batch], {"orthonormal": False, "tol": 0.05})
  stds = layer_stds(model, {"params": res.params}, batch["image"])
  assert abs(stds["z_first"] - 1.0) <= 0.05  # processed last
  assert abs(stds["a_second"] - 1.0) > 0.1 or abs(stds["m_third"] - 1.0) > 0.1, stds


def test_layer_order_is_execution_order(mlp, cnn):
  model, params, batch = mlp
  assert sorted(params) != list(MLP.names)  # names sort otherwise than they run
  layers = lsuv_layers(linen_loss_fn(model), params, batch)
  assert [layer.kernel for layer in layers] == [f"{n}/kernel" for n in MLP.names]
  assert [layer.bias for layer in layers] == [f"{n}/bias" for n in MLP.names]
  model, params, batch = cnn
  layers = lsuv_layers(linen_loss_fn(model), params, batch)
  assert [(layer.kind, layer.kernel) for layer in layers] == [
    ("conv", "conv_b/kernel"),
    ("conv", "conv_a/kernel"),
    ("dense", "head/kernel"),
  ]


@pytest.mark.parametrize("orthonormal", [False, True])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_each_layer_output_has_unit_variance(which, orthonormal, request):
  model, params, batch = request.getfixturevalue(which)
  cfg = LSUVConfig(orthonormal=orthonormal, tol=0.05)
  res = initialize("lsuv", linen_loss_fn(model), params, [batch], cfg)
  stds = layer_stds(model, {"params": res.params}, batch["image"])
  assert len(stds) == 3
  for name, s in stds.items():
    assert abs(s - 1.0) <= 0.05, (name, stds)
  before = layer_stds(model, {"params": params}, batch["image"])
  if not orthonormal:  # LSUV had work to do
    assert any(abs(s - 1.0) > 0.2 for s in before.values()), before
  h = res.history
  assert list(h["layer"]) == [
    layer.kernel for layer in lsuv_layers(linen_loss_fn(model), params, batch)
  ]
  np.testing.assert_allclose(h["std_after"], [stds[k.split("/")[0]] for k in h["layer"]], rtol=1e-5)
  assert h["converged"].all() and (h["iterations"] >= 0).all()
  assert res.method == "lsuv" and res.config["orthonormal"] == orthonormal


def test_scales_reproduce_params_without_orthonormal(mlp):
  model, params, batch = mlp
  res = lsuv(linen_loss_fn(model), params, [batch], {"orthonormal": False})
  again = apply_scales(params, res.scales)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(res.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in MLP.names:
    assert float(res.scales[name]["bias"]) == 1.0
    np.testing.assert_array_equal(res.params[name]["bias"], params[name]["bias"])


def test_orthonormal_kernels_and_zero_biases(cnn):
  model, params, batch = cnn
  res = initialize("lsuv", linen_loss_fn(model), params, [batch])
  assert res.scales is None
  for name in ("conv_b", "conv_a", "head"):
    k = np.asarray(res.params[name]["kernel"], np.float64)
    m = k.reshape(-1, k.shape[-1])  # (fan_in, fan_out)
    g = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    np.testing.assert_allclose(g / g[0, 0], np.eye(g.shape[0]), atol=1e-5)
    np.testing.assert_array_equal(res.params[name]["bias"], 0.0)
  again = initialize("lsuv", linen_loss_fn(model), params, [batch])
  for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(res.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = initialize("lsuv", linen_loss_fn(model), params, [batch], {"seed": 1})
  assert not np.allclose(other.params["head"]["kernel"], res.params["head"]["kernel"])


def test_plain_jax_loss_and_jitted_inner_function():
  params = tm.mlp_params(jax.random.PRNGKey(0), (5, 9, 3))
  batch = tm.mlp_batch(jax.random.PRNGKey(1), b=16)
  inner = jax.jit(tm.mlp_logits)
  loss = lambda p, b: tm.xent(inner(p, b["x"]), b["y"])
  layers = lsuv_layers(loss, params, batch)
  assert [layer.kernel for layer in layers] == ["dense0/kernel", "dense1/kernel"]
  assert all(len(layer.site) == 2 for layer in layers)  # inside the jit call
  res = initialize("lsuv", loss, params, iter([batch, None]), {"orthonormal": False})
  h = tm.mlp_logits(res.params, batch["x"])
  assert abs(float(jnp.std(h, ddof=1)) - 1.0) <= 0.1
  assert res.history["std_after"].shape == (2,)


# ------------------------------------------------------------------ batch norm, scan


def test_batch_norm_in_training_mode():
  """Batch statistics (what `linen_loss_fn(batch_stats=)` runs): every conv output, before
  its batch norm, is brought to unit variance."""
  model = CNN(bn=True)
  batch = batch_of(jax.random.PRNGKey(3), (8, 8, 2))
  v = model.init(jax.random.PRNGKey(0), batch["image"])
  loss = linen_loss_fn(model, batch_stats=v["batch_stats"])
  res = initialize("lsuv", loss, scaled(v["params"], 5.0), [batch], {"orthonormal": False})
  stds = layer_stds(model, {**v, "params": res.params}, batch["image"], train=True)
  assert set(stds) == {"conv_b", "conv_a", "head"}
  for name, s in stds.items():
    assert abs(s - 1.0) <= 0.1, (name, stds)
  assert res.history["iterations"][0] >= 1  # the kernels x5 needed rescaling


@pytest.mark.slow
def test_zoo_resnet_with_batch_norm_unscanned():
  net = models.CifarResNet(depth=14, width=4, num_classes=3, scan=False)
  x = batch_of(jax.random.PRNGKey(4), (8, 8, 3), b=8)
  v = jax.jit(net.init)(jax.random.PRNGKey(0), x["image"])
  res = initialize("lsuv", linen_loss_fn(net, batch_stats=v["batch_stats"]), v["params"], [x])
  kernels = [
    p for p, _ in jax.tree_util.tree_leaves_with_path(v["params"]) if p[-1].key == "kernel"
  ]
  assert len(res.history["layer"]) == len(kernels) >= 14
  assert np.all(np.abs(res.history["std_after"] - 1.0) <= 0.1)


def test_scanned_layouts_are_refused():
  net = models.CifarResNet(depth=14, width=4, num_classes=3, norm="none")  # scan=True
  x = batch_of(jax.random.PRNGKey(4), (8, 8, 3), b=4)
  v = jax.eval_shape(net.init, jax.random.PRNGKey(0), x["image"])  # refused from shapes alone
  with pytest.raises(ValueError, match=r"scanned layouts.*scan=False.*stage\d_scan"):
    initialize("lsuv", linen_loss_fn(net), v["params"], [x])

  class Scanned(nn.Module):  # an nn.scan stack whose name does not end in "_scan"
    @nn.compact
    def __call__(self, x, train=False):
      stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      x, _ = stack(name="blocks")(x, None)
      return nn.Dense(3)(x)

  model = Scanned()
  batch = batch_of(jax.random.PRNGKey(5), (6,))
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  with pytest.raises(ValueError, match=r"scanned layouts.*'scan' equation"):
    lsuv_layers(linen_loss_fn(model), params, batch)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.tanh(nn.Dense(6)(c)), None


# ------------------------------------------------------------------ the lsuv package


def torch_twin(kind, params, bn=False):
  """A PyTorch model with the weights of `MLP(act="tanh")` / `CNN`, modules registered in
  execution order (the package's layer order is the registration order)."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn

  def lin(p):
    m = tnn.Linear(*np.shape(p["kernel"]))
    m.weight.data = torch.tensor(np.asarray(p["kernel"]).T.copy())
    m.bias.data = torch.tensor(np.asarray(p["bias"]).copy())
    return m

  def conv(p, stride):
    k = np.asarray(p["kernel"])
    m = tnn.Conv2d(k.shape[2], k.shape[3], 3, stride=stride, padding=1, bias="bias" in p)
    m.weight.data = torch.tensor(k.transpose(3, 2, 0, 1).copy())
    if "bias" in p:
      m.bias.data = torch.tensor(np.asarray(p["bias"]).copy())
    return m

  class NHWCFlatten(tnn.Module):
    def forward(self, x):
      return x.permute(0, 2, 3, 1).flatten(1)

  if kind == "mlp":
    names = MLP.names
    return tnn.Sequential(
      lin(params[names[0]]), tnn.Tanh(), lin(params[names[1]]), tnn.Tanh(), lin(params[names[2]])
    )
  norm = (lambda c: tnn.BatchNorm2d(c)) if bn else (lambda c: tnn.Identity())
  return tnn.Sequential(
    conv(params["conv_b"], 2),
    norm(4),
    tnn.ReLU(),
    conv(params["conv_a"], 1),
    norm(6),
    tnn.Tanh(),
    NHWCFlatten(),
    lin(params["head"]),
  )


def torch_kernels(net):
  import torch

  out = []
  for m in net.modules():
    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
      w = m.weight.detach().numpy()
      out.append(w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0))
  return out


def run_package(net, x, **kwargs):
  torch = pytest.importorskip("torch")
  lsuv_pkg = pytest.importorskip("lsuv")
  torch.set_num_threads(2)
  return lsuv_pkg.lsuv_with_singlebatch(
    net, torch.tensor(np.ascontiguousarray(x)), do_orthonorm=False, verbose=False, **kwargs
  )


def leaf_dict(params):
  return {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("case", ["mlp", "cnn", "cnn_bn_eval", "cnn_max_iter_0", "mlp_11_iters"])
def test_matches_lsuv_package(case, mlp, cnn):
  """The rescaled kernels equal those of `lsuv.lsuv_with_singlebatch` on a PyTorch twin with
  the same weights and batch (`do_orthonorm=False`: the package draws its orthonormal
  matrices from torch's RNG), run in eval mode as the package runs it. Layers after the
  first get at most one correction here (see `test_package_misplaces_later_corrections`)."""
  pytest.importorskip("torch")
  pytest.importorskip("lsuv")
  cfg = {"orthonormal": False}
  if case.startswith("mlp"):
    model, params, batch = mlp
    if case == "mlp_11_iters":  # a spread-out bias: the first layer never reaches tol
      params = {**params, "z_first": {**params["z_first"], "bias": jnp.linspace(-3.0, 3.0, 16)}}
    x, loss = np.asarray(batch["image"]), linen_loss_fn(model)
  else:
    model, params, batch = cnn
    loss = linen_loss_fn(model)
    if case == "cnn_bn_eval":  # batch norm with the (initial) running statistics
      model = CNN(bn=True)
      v = model.init(jax.random.PRNGKey(7), batch["image"])
      params = scaled(v["params"], 0.3)
      loss = linen_loss_fn(model, batch_stats=v["batch_stats"], apply_kwargs={})
    if case == "cnn_max_iter_0":  # tol 0: one correction per layer, then the cap stops it
      cfg.update(max_iter=0, tol=0.0)
    x = np.asarray(batch["image"]).transpose(0, 3, 1, 2)
  kwargs = {"max_attempts": 0, "std_tol": 0.0} if "max_iter" in cfg else {}
  net = run_package(torch_twin(case[:3], params, bn=case == "cnn_bn_eval"), x, **kwargs)
  res = initialize("lsuv", loss, params, [batch], cfg)
  its = res.history["iterations"]
  assert (its[1:] <= 1).all(), its  # where the package rescales the layer it measures
  if case == "mlp_11_iters":
    assert its[0] == 11 and not res.history["converged"][0]
  if case == "cnn_max_iter_0":
    assert (its == 1).all()
  flat = leaf_dict(res.params)
  for name, theirs in zip(res.history["layer"], torch_kernels(net), strict=True):
    np.testing.assert_allclose(np.asarray(flat[name]), theirs, rtol=1e-5, atol=0, err_msg=name)


def test_package_misplaces_later_corrections(mlp):
  """Where this implementation deliberately differs from `lsuv` 0.3.0: the package resets
  its `counter_to_apply_correction` per layer, not per attempt, so from the second
  correction of a layer after the first one on, it rescales the *first* layer instead of
  the layer it measures. Here the last layer cannot converge (spread-out bias): the package
  rescales it once and shrinks the first layer 10 times; nio_jax rescales the last layer 11
  times and leaves the others as they were after their own pass."""
  pytest.importorskip("torch")
  pytest.importorskip("lsuv")
  model, params, batch = mlp
  params = {**params, "m_third": {**params["m_third"], "bias": jnp.linspace(-20.0, 20.0, 5)}}
  net = run_package(torch_twin("mlp", params), np.asarray(batch["image"]))
  res = initialize("lsuv", linen_loss_fn(model), params, [batch], {"orthonormal": False})
  h, flat = res.history, leaf_dict(res.params)
  assert list(h["iterations"][:2]) == [1, 1] and h["iterations"][2] == 11
  first, _, last = torch_kernels(net)
  once = float(np.float32(1.0 / (h["std_before"][2] + 1e-8)))  # the first correction
  np.testing.assert_allclose(last, np.asarray(params["m_third"]["kernel"]) * once, rtol=1e-5)
  assert np.abs(first).max() < 1e-6 * np.abs(np.asarray(flat["z_first/kernel"])).max()
  ratio = np.asarray(flat["m_third/kernel"]) / np.asarray(params["m_third"]["kernel"])
  np.testing.assert_allclose(ratio, float(res.scales["m_third"]["kernel"]), rtol=1e-5)
  assert float(res.scales["m_third"]["kernel"]) < 1e-6


# ------------------------------------------------------------------ interface and errors


def test_registered_with_config_plumbing():
  assert "lsuv" in available_methods()
  assert get_method("lsuv").config_cls is LSUVConfig
  assert LSUVConfig.create().to_dict() == dict(
    target_std=1.0, tol=0.1, max_iter=10, orthonormal=True, seed=0
  )
  from nio_jax import experiment_config as cfgmod

  cfg = cfgmod.base_config()
  cfgmod.apply_override(cfg, "init.method", "lsuv")
  cfgmod.apply_override(cfg, "init.config.tol", 0.05)
  cfgmod.apply_override(cfg, "init.config.orthonormal", False)
  cfgmod.apply_override(cfg, "seed", 3)
  mcfg = cfgmod.build_method_config(cfg)
  assert mcfg == LSUVConfig(tol=0.05, orthonormal=False, seed=3)  # the run's seed by default
  assert cfgmod.search_batches(cfg, mcfg) == 1
  cfgmod.apply_override(cfg, "init.config.seed", 5)
  assert cfgmod.build_method_config(cfg).seed == 5
  cfgmod.apply_override(cfg, "init.config.max_attempts", 3)
  with pytest.raises(cfgmod.ConfigError, match="unknown LSUV config key"):
    cfgmod.build_method_config(cfg)


def test_bad_input(mlp):
  model, params, batch = mlp
  loss = linen_loss_fn(model)
  one = jax.tree_util.tree_map(lambda x: x[:1], batch)
  with pytest.raises(ValueError, match="at least 2 examples"):
    initialize("lsuv", loss, params, [one])
  with pytest.raises(ValueError, match=r"unknown LSUV config key\(s\) \['max_attempts'\]"):
    initialize("lsuv", loss, params, [batch], {"max_attempts": 3})
  for bad, exc in (
    ({"tol": -0.1}, ValueError),
    ({"target_std": 0.0}, ValueError),
    ({"max_iter": -1}, ValueError),
    ({"orthonormal": "yes"}, TypeError),
  ):
    with pytest.raises(exc):
      LSUVConfig.create(bad)
  with pytest.raises(TypeError, match="not a single batch"):
    initialize("lsuv", loss, params, batch)
  with pytest.raises(ValueError, match="empty"):
    initialize("lsuv", loss, params, [])
  nan_batch = {**batch, "image": batch["image"].at[0, 0].set(jnp.nan)}
  with pytest.raises(ValueError, match="NaN or inf"):
    initialize("lsuv", loss, params, [nan_batch])

  nan_params = jax.tree_util.tree_map(lambda x: x, params)
  nan_params["a_second"]["kernel"] = params["a_second"]["kernel"].at[0, 0].set(jnp.inf)
  with pytest.raises(nio_jax.NonFiniteError, match="layer 1.*a_second/kernel") as e:
    initialize("lsuv", loss, nan_params, [batch], {"orthonormal": False})
  assert e.value.step == 1 and e.value.last_good.history["layer"].tolist() == ["z_first/kernel"]

  nan_loss = lambda p, b: loss(p, b) + jnp.log(-1.0)
  with pytest.raises(nio_jax.NonFiniteError, match="loss is NaN"):
    initialize("lsuv", nan_loss, params, [batch])

  dead = jax.tree_util.tree_map(lambda x: x, params)
  dead["z_first"] = jax.tree_util.tree_map(jnp.zeros_like, params["z_first"])
  with pytest.raises(ValueError, match="constant on the batch"):
    initialize("lsuv", loss, dead, [batch], {"orthonormal": False})

  shared = lambda p, b: tm.xent(b["x"] @ p["w"] @ p["w"].T @ p["h"], b["y"])
  p2 = {"w": jnp.ones((5, 5)), "h": jnp.ones((5, 3))}
  with pytest.raises(ValueError, match=r"\['w'\] are used by several layers"):
    initialize("lsuv", shared, p2, [tm.mlp_batch(jax.random.PRNGKey(0))])
  no_layer = lambda p, b: tm.xent(b["x"][:, :3] * p["s"], b["y"])
  with pytest.raises(ValueError, match="no conv / dense layer"):
    initialize("lsuv", no_layer, {"s": jnp.ones(3)}, [tm.mlp_batch(jax.random.PRNGKey(0))])
