"""LSUV (`nio_jax.methods.lsuv`): unit output variance per layer, layer order from the
execution, the `lsuv` 0.3.0 package on PyTorch twins, batch norm, scanned layouts, bad input;
target_std and the bias zeroing (each test fails on a one-line break of the method), the
tolerance rule, non-convergence warnings, tied weights, true biases only, input-only batches
(`loss_fn.forward`) and dropout."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from nio_jax import errors, models, stochastic
from nio_jax.flax_utils import linen_loss_fn, nnx_loss_fn
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
      loss = linen_loss_fn(model, batch_stats=v["batch_stats"], train=False)
    if case == "cnn_max_iter_0":  # tol 0: one correction per layer, then the cap stops it
      cfg.update(max_iter=0, tol=0.0)
    x = np.asarray(batch["image"]).transpose(0, 3, 1, 2)
  kwargs = {"max_attempts": 0, "std_tol": 0.0} if "max_iter" in cfg else {}
  net = run_package(torch_twin(case[:3], params, bn=case == "cnn_bn_eval"), x, **kwargs)
  if case in ("mlp_11_iters", "cnn_max_iter_0"):  # tol not reached: warned and recorded
    with pytest.warns(UserWarning, match=r"layer \d \(kernel '\w+/kernel'\) did not converge"):
      res = initialize("lsuv", loss, params, [batch], cfg)
  else:
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
  with pytest.warns(UserWarning, match="layer 2 .*'m_third/kernel'.* did not converge"):
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
    target_std=1.0, tol=0.1, max_iter=10, orthonormal=True, seed=0, tol_on="std", exclude=()
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


# ------------------------------------------------------------------ issue 29: target, biases


def with_biases(params, names=MLP.names):
  """Every named layer's bias set to a non-zero spread."""
  out = dict(params)
  for n in names:
    b = params[n]["bias"]
    out[n] = {**params[n], "bias": jnp.linspace(-0.5, 1.0, b.shape[0])}
  return out


@pytest.mark.parametrize("orthonormal", [False, True])
def test_target_std_is_reached_per_layer(mlp, orthonormal):
  """`target_std=0.5` ends with every layer's output at std 0.5 (fails if the method scales
  every layer to std 1 whatever `target_std` says)."""
  model, params, batch = mlp
  cfg = {"target_std": 0.5, "tol": 0.02, "orthonormal": orthonormal}
  res = initialize("lsuv", linen_loss_fn(model), params, [batch], cfg)
  stds = layer_stds(model, {"params": res.params}, batch["image"])
  assert len(stds) == 3
  for name, s in stds.items():
    assert abs(s - 0.5) <= 0.02, (name, stds)
  np.testing.assert_allclose(res.history["std_after"], 0.5, atol=0.02)
  assert res.history["converged"].all()


def test_orthonormal_pre_init_zeroes_nonzero_biases(mlp):
  """Non-zero initial biases are exactly 0 after the orthonormal pre-init (fails if the
  method keeps them); without it they are kept."""
  model, params, batch = mlp
  params = with_biases(params)
  res = initialize("lsuv", linen_loss_fn(model), params, [batch])
  for n in MLP.names:
    np.testing.assert_array_equal(np.asarray(res.params[n]["bias"]), 0.0)
  stds = layer_stds(model, {"params": res.params}, batch["image"])
  assert all(abs(s - 1.0) <= 0.1 for s in stds.values()), stds
  kept = initialize("lsuv", linen_loss_fn(model), params, [batch], {"orthonormal": False})
  for n in MLP.names:
    np.testing.assert_array_equal(kept.params[n]["bias"], params[n]["bias"])


# ------------------------------------------------------------------ tolerance rule


def test_tol_on_std_or_variance():
  """`tol_on="std"` (the package's rule) accepts a layer at std 1.07 (variance 1.145);
  `tol_on="variance"` (the paper's, |Var − 1| < tol) rescales it until |std² − 1| < 0.1."""
  batch = tm.mlp_batch(jax.random.PRNGKey(0), b=64, d=6, c=4)
  w = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  w = w * 1.07 / jnp.std(batch["x"] @ w, ddof=1)
  loss = lambda p, b: tm.xent(b["x"] @ p["w"], b["y"])
  cfg = {"orthonormal": False, "tol": 0.1}
  on_std = initialize("lsuv", loss, {"w": w}, [batch], {**cfg, "tol_on": "std"})
  h = on_std.history
  assert h["iterations"][0] == 0 and h["converged"][0]
  assert abs(h["std_after"][0] - 1.07) < 1e-4 and h["std_after"][0] ** 2 > 1.1
  on_var = initialize("lsuv", loss, {"w": w}, [batch], {**cfg, "tol_on": "variance"})
  h = on_var.history
  assert h["iterations"][0] >= 1 and h["converged"][0]
  assert abs(h["std_after"][0] ** 2 - 1.0) < 0.1
  s = float(jnp.std(batch["x"] @ on_var.params["w"], ddof=1))
  np.testing.assert_allclose(s, h["std_after"][0], rtol=1e-5)
  assert on_var.config["tol_on"] == "variance"
  with pytest.raises(ValueError, match="unknown tol_on 'var'"):
    LSUVConfig.create({"tol_on": "var"})


# ------------------------------------------------------------------ non-convergence, messages


def test_non_converged_layer_warns_at_the_users_call(mlp):
  """A zero batch with the orthonormal step off and non-zero biases: the first layer's
  output is its bias whatever its kernel, so 11 corrections leave it off target: a warning
  (pointing at this file) names the layer, its std and the corrections, and the history
  marks it."""
  model, params, batch = mlp
  zero = {**batch, "image": jnp.zeros_like(batch["image"])}
  cfg = {"orthonormal": False}
  for call in (
    lambda: initialize("lsuv", linen_loss_fn(model), with_biases(params), [zero], cfg),
    lambda: lsuv(linen_loss_fn(model), with_biases(params), [zero], cfg),
  ):
    with pytest.warns(UserWarning, match="did not converge") as rec:
      res = call()
    msgs = [w for w in rec if "did not converge" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in rec]
    text = str(msgs[0].message)
    std = res.history["std_after"][0]
    assert "layer 0 (kernel 'z_first/kernel')" in text and f"{std:.8g}" in text
    assert "after 11 corrections" in text
    assert msgs[0].filename == __file__
    assert list(res.history["converged"]) == [False, True, True]
    assert res.history["iterations"][0] == 11
    assert float(res.scales["z_first"]["kernel"]) > 1e3  # 11 corrections that did nothing


def test_constant_output_message_fits_the_orthonormal_setting(mlp):
  model, params, batch = mlp
  loss = linen_loss_fn(model)
  dead = {**params, "z_first": jax.tree_util.tree_map(jnp.zeros_like, params["z_first"])}
  with pytest.raises(ValueError, match="constant on the batch.*Use orthonormal=True"):
    initialize("lsuv", loss, dead, [batch], {"orthonormal": False})
  zero = {**batch, "image": jnp.zeros_like(batch["image"])}
  with pytest.raises(ValueError, match="constant on the batch") as e:
    initialize("lsuv", loss, params, [zero])  # orthonormal=True: biases zeroed, input 0
  assert "already a random orthonormal" in str(e.value)
  assert "Use orthonormal=True" not in str(e.value)


# ------------------------------------------------------------------ true biases, tied weights


class PosAfterDense(nn.Module):
  """A parameter of the enclosing module added right after a bias-free Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    pos = self.param("pos", nn.initializers.normal(1.0), (8,))
    x = jnp.tanh(nn.Dense(8, use_bias=False, name="proj")(x) + pos)
    return nn.Dense(3, name="head")(x)


def test_only_a_true_bias_is_taken_as_the_bias():
  model = PosAfterDense()
  batch = batch_of(jax.random.PRNGKey(6), (7,))
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  params = {**params, "head": {**params["head"], "bias": jnp.full((3,), 0.3)}}
  layers = lsuv_layers(linen_loss_fn(model), params, batch)
  assert [(la.kernel, la.bias) for la in layers] == [
    ("proj/kernel", None),
    ("head/kernel", "head/bias"),
  ]
  res = initialize("lsuv", linen_loss_fn(model), params, [batch])
  np.testing.assert_array_equal(np.asarray(res.params["pos"]), np.asarray(params["pos"]))
  np.testing.assert_array_equal(np.asarray(res.params["head"]["bias"]), 0.0)

  # Plain JAX, one flat module: named like a bias (Haiku's "b") and one per output: a bias;
  # another name, or another size, is not.
  x = {"x": jnp.ones((4, 5)), "y": jnp.zeros((4,), jnp.int32)}
  k = jnp.ones((5, 3))
  for extra, bias in (({"b": jnp.ones(3)}, "b"), ({"pos": jnp.ones(3)}, None)):
    name = next(iter(extra))
    loss = lambda p, b, n=name: tm.xent(b["x"] @ p["w"] + p[n], b["y"])
    assert lsuv_layers(loss, {"w": k, **extra}, x)[0].bias == bias
  loss = lambda p, b: tm.xent(b["x"] @ p["lin"]["w"] + p["lin"]["bias"], b["y"])
  assert lsuv_layers(loss, {"lin": {"w": k, "bias": jnp.ones(())}}, x)[0].bias is None


class TiedLM(nn.Module):
  """An embedding whose `attend` is the output projection (tied weights)."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embed = nn.Embed(11, 8, name="embed")
    h = jnp.tanh(nn.Dense(8, name="hidden")(embed(tokens)))
    return embed.attend(h)


def test_tied_embedding_is_refused_with_the_fix():
  """The embedding is both the input lookup and the last layer's kernel: rescaling it for
  the last layer would change the earlier layer's output after it was measured (its std
  would be recorded as 1 but be 1.51), so LSUV refuses it, naming the leaf and the fixes;
  `exclude` leaves it alone and the other layers are initialised."""
  model = TiedLM()
  batch = {"x": jnp.arange(B) % 11, "y": jnp.arange(B) % 11}
  v = model.init(jax.random.PRNGKey(0), batch["x"])
  loss = linen_loss_fn(model)
  with pytest.raises(ValueError, match=r"'embed/embedding'.*\['hidden/kernel'\].*tied.*exclude="):
    initialize("lsuv", loss, v["params"], [batch])
  with pytest.raises(ValueError, match="exclude=\\['nope'\\] names no parameter leaf"):
    initialize("lsuv", loss, v["params"], [batch], {"exclude": ["nope"]})
  res = initialize("lsuv", loss, v["params"], [batch], {"exclude": ("embed/embedding",)})
  assert list(res.history["layer"]) == ["hidden/kernel"]
  np.testing.assert_array_equal(res.params["embed"]["embedding"], v["params"]["embed"]["embedding"])
  stds = layer_stds(model, {"params": res.params}, batch["x"])
  np.testing.assert_allclose(stds["hidden"], res.history["std_after"][0], rtol=1e-5)
  assert abs(stds["hidden"] - 1.0) <= 0.1
  assert res.config["exclude"] == ("embed/embedding",)


# ------------------------------------------------------------------ input-only batches, dropout


class NNXMLP:
  """Built lazily (flax.nnx imported inside the test)."""

  @staticmethod
  def make():
    from flax import nnx

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.first = nnx.Linear(7, 16, rngs=rngs)
        self.second = nnx.Linear(16, 5, rngs=rngs)

      def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))

    return Net(nnx.Rngs(0))


@pytest.mark.parametrize("adapter", ["linen", "nnx"])
def test_batches_need_only_the_inputs(adapter, mlp):
  """The adapters' `loss_fn.forward` reads only the inputs, and LSUV runs it: a dict with
  only "image", a bare array and a tuple `(x,)` give the same result as a labelled batch."""
  model, params, batch = mlp
  if adapter == "linen":
    loss = linen_loss_fn(model)
  else:
    loss, params = nnx_loss_fn(NNXMLP.make())
  x = batch["image"]
  runs = [initialize("lsuv", loss, params, [b]) for b in (batch, {"image": x}, x, (x,))]
  for res in runs:
    assert res.history["converged"].all() and len(res.history["layer"]) >= 2
    for a, b in zip(
      jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(runs[0].params)
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(lsuv_layers(loss, params, x)) == len(runs[0].history["layer"])


def test_forward_input_checks(mlp):
  _, params, batch = mlp
  x = batch["image"]
  loss = lambda p, b: tm.xent(b @ p["z_first"]["kernel"], jnp.zeros(b.shape[0], jnp.int32))
  loss.forward = lambda p, b: b["missing"] @ p["z_first"]["kernel"]
  with pytest.raises(errors.LossFnError, match=r"LSUV runs loss_fn.forward.*forward\(params"):
    initialize("lsuv", loss, params, [x])
  loss.forward = lambda p, b: jnp.sum(b @ p["z_first"]["kernel"])
  with pytest.raises(ValueError, match="batch axis first"):
    initialize("lsuv", loss, params, [x])
  loss.forward = lambda p, b: b @ p["z_first"]["kernel"]  # labels never read
  with pytest.warns(UserWarning, match=r"\['a_second/kernel', 'm_third/kernel'\] are not"):
    res = initialize("lsuv", loss, params, [x])
  assert list(res.history["layer"]) == ["z_first/kernel"]


class DropoutMLP(nn.Module):
  """Dropout (rate 0.5) behind a flag named `training`."""

  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.relu(nn.Dense(16, name="d0")(x))
    x = nn.Dropout(0.5, deterministic=not training)(x)
    x = jnp.tanh(nn.Dense(12, name="d1")(x))
    x = nn.Dropout(0.5, deterministic=not training)(x)
    return nn.Dense(5, name="d2")(x)


def test_dropout_on_and_off():
  """Dropout on (the adapter's default): the first batch is keyed once, and the layers are
  found and measured with the masks of that key (the outputs recomputed with flax's own
  dropout and that key have the recorded, unit std). Dropout off: measured deterministic."""
  model = DropoutMLP()
  batch = batch_of(jax.random.PRNGKey(8), (7,), classes=5, b=64)
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  on = linen_loss_fn(model)
  res_on = initialize("lsuv", on, params, [batch])
  key = stochastic.keyed_batch(on, batch).keys[0]
  stds_on = layer_stds(
    model,
    {"params": res_on.params},
    batch["image"],
    training=True,
    # What linen_loss_fn passes: stream i of rng_streams gets fold_in(batch key, i).
    rngs={"dropout": jax.random.fold_in(key, 0)},
  )
  stds_on = {k: stds_on[k] for k in ("d0", "d1", "d2")}
  np.testing.assert_allclose(list(stds_on.values()), res_on.history["std_after"], rtol=1e-5)
  assert all(abs(s - 1.0) <= 0.1 for s in stds_on.values()), stds_on

  off = linen_loss_fn(model, dropout=False)
  res_off = initialize("lsuv", off, params, [batch])
  stds_off = layer_stds(model, {"params": res_off.params}, batch["image"], training=False)
  stds_off = {k: stds_off[k] for k in ("d0", "d1", "d2")}
  np.testing.assert_allclose(list(stds_off.values()), res_off.history["std_after"], rtol=1e-5)
  assert all(abs(s - 1.0) <= 0.1 for s in stds_off.values()), stds_off
  # the masks matter: the layers after a dropout get other kernels
  np.testing.assert_array_equal(res_on.params["d0"]["kernel"], res_off.params["d0"]["kernel"])
  assert not np.allclose(res_on.params["d2"]["kernel"], res_off.params["d2"]["kernel"])
