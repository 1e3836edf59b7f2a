"""LSUV (Mishkin & Matas, ICLR 2016, "All you need is a good init"): layer-sequential
unit-variance initialisation.

Layer by layer, in the order the forward pass runs them, the kernel of each conv / dense layer
is divided by the standard deviation of the layer's output on one batch until that deviation
is within `tol` of `target_std`; optionally every kernel is first replaced by an orthonormal
one (and its bias zeroed). The loop follows the reference implementation, the PyPI package
`lsuv` 0.3.0 (`lsuv.lsuv_with_dataloader`, D. Mishkin; the tests compare the two on PyTorch
twins), except where listed at the end:

* the statistic is the unbiased standard deviation (`torch.Tensor.std()`, Bessel-corrected)
  over every element of the layer's output, bias included (the module output, where the
  package's forward hook sits);
* while `|std − target_std| > tol`: `kernel ← kernel · target_std / (std + 1e-8)`, the
  output measured again, `attempts += 1`, and the loop stops once `attempts > max_iter`
  (so at most `max_iter + 1` corrections, as in the package); the bias is never rescaled;
* the orthonormal pre-initialisation (`do_orthonorm=True` by default) replaces each kernel,
  reshaped to a `(fan_in, fan_out)` matrix, by a random orthonormal one (gain 1, as
  `torch.nn.init.orthogonal_`) and sets its bias to 0, for every layer before the loop starts.

Layers and their order come from the model's execution, not from parameter names: the loss
function is traced once to a jaxpr (`jax.make_jaxpr(loss_fn)(params, batch)`), and every
`conv_general_dilated` / `dot_general` equation one of whose operands is a parameter leaf
(directly or through reshapes, transposes, dtype casts) is a layer, in jaxpr order. When the
very next use of its output adds another parameter leaf (the flax `Dense` / `Conv` bias), that
sum is the layer's output and that leaf its bias. Layer outputs are then computed by
re-evaluating the jaxpr with the current params and recording those values (one compiled
function for all layers). This works for any `loss_fn(params, batch)`, Flax or not, and sees
through `jit`, `remat` and custom-derivative calls.

Supported: dense layers (`nn.Dense`, `nn.DenseGeneral`, plain `x @ W`), convolutions of any
dimension, stride, padding, dilation and feature grouping, and batch norm (the layers are
measured the way `loss_fn` runs the model: `nio_jax.flax_utils.linen_loss_fn(...,
batch_stats=)` uses batch statistics; the package puts the model in eval mode, i.e. running
statistics, so pass a loss that applies the model with `train=False` to reproduce it).
Not supported (a clear `ValueError`): layers inside `lax.scan` / `nn.scan` (the models'
`stageN_scan` layouts: build them with `scan=False`), a kernel used by several layers
(weight sharing), and dot products with batch dimensions on the parameter.

Differences from the package:

* every correction rescales the layer being measured. The package resets its
  `counter_to_apply_correction` once per layer, not once per attempt, so from the second
  correction of any layer after the first one on it rescales the *first* layer instead (in
  the package's default, orthonormal kernels with zero biases, one correction per layer is
  exact for a conv / dense layer, and the two agree);
* attention is not one unit (the package scales `nn.MultiheadAttention` by its output
  projection only; here the query / key / value / output projections are four dense layers);
* a layer whose output is constant (deviation 0) raises instead of having its kernel
  multiplied by 1e8;
* the layer order is the execution order (the package's is the modules' registration order,
  the same for sequential models).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, errors, leaves, method_config
from nio_jax.jaxpr_rewrites import (
  INLINE_CALLS,
  bind_equation,
  check_jaxpr_internals,
  sub_jaxprs,
)
from nio_jax.methods.registry import register
from nio_jax.results import InitResult
from nio_jax.search import check_search_inputs, peek, progress_bar, shard_search

PyTree = Any

#: The package's constant in `needed_std / (current_std + 1e-8)`.
STD_EPS = 1e-8

# Linear, invertible views of a parameter leaf (the kernel may pass through them on its way to
# the conv / dot); `broadcast_in_dim` only for biases (not invertible).
_VIEW_OPS = frozenset(
  {"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "rev", "copy"}
)
_BIAS_VIEW_OPS = _VIEW_OPS | {"broadcast_in_dim"}
_LAYER_OPS = ("conv_general_dilated", "dot_general")

_SCAN_HINT = (
  "LSUV does not support scanned layouts (layers inside lax.scan / nn.scan, e.g. the models' "
  "'stageN_scan' stacks, whose blocks share one stacked kernel): build the model with "
  "scan=False (nio_jax.models.get(name, scan=False); nio_jax.models.unstack_blocks converts "
  "params)."
)


@dataclasses.dataclass(frozen=True)
class LSUVConfig:
  """LSUV hyper-parameters; the defaults are those of the `lsuv` 0.3.0 package.

  Attributes:
    target_std: the standard deviation each layer's output is brought to (the package's
      `needed_std`, 1.0: unit variance).
    tol: tolerance on the standard deviation, `|std − target_std| ≤ tol` (`std_tol`, 0.1).
    max_iter: the package's `max_attempts` (10): the loop stops once more than `max_iter`
      corrections were made, so a layer gets at most `max_iter + 1`.
    orthonormal: replace every kernel by a random orthonormal one and zero its bias first
      (`do_orthonorm`, True, as in the paper).
    seed: PRNG seed of the orthonormal draw (layer `l` uses `fold_in(PRNGKey(seed), l)`).
  """

  target_std: float = 1.0
  tol: float = 0.1
  max_iter: int = 10
  orthonormal: bool = True
  seed: int = 0

  @classmethod
  def create(cls, config=None, **overrides) -> LSUVConfig:
    """From None (defaults), an LSUVConfig, a dict or an ml_collections ConfigDict."""
    cfg = cls(**method_config.config_values(cls, config, overrides, "LSUV"))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises `TypeError` / `ValueError` naming a bad field."""
    checks.check_positive("target_std", self.target_std)
    checks.check_positive("tol", self.tol, allow_zero=True)
    method_config.check_int("max_iter", self.max_iter, 0, " (LSUV corrections per layer, minus 1)")
    if not isinstance(self.orthonormal, (bool, np.bool_)):
      raise TypeError(f"orthonormal must be a bool, got {self.orthonormal!r}.")
    method_config.check_int("seed", self.seed, 0)

  def to_dict(self) -> dict:
    """The fields as a plain dict."""
    return method_config.to_plain_dict(self)


# ------------------------------------------------------------------ finding the layers


@dataclasses.dataclass(frozen=True)
class LSUVLayer:
  """One layer LSUV rescales, as found in the traced loss function.

  Attributes:
    kind: "conv" or "dense".
    kernel: path of the kernel leaf, e.g. "block1/conv/kernel".
    bias: path of the bias leaf added to its output, or None.
    kernel_index / bias_index: flat indices of those leaves in `jax.tree_util.tree_leaves`.
    site: address of the equation whose output is the layer's output (the bias add, else the
      conv / dot itself): equation indices, one per nested call.
    fan_in_axes / fan_out_axes: axes of the kernel *as the op sees it* (`operand_shape`)
      that are summed over / produce output features (the orthonormal draw's matrix rows /
      columns).
    operand_shape: the kernel's shape as the op sees it.
    view: the ops that turn the kernel leaf into the op's operand (inverted to map the
      orthonormal draw back onto the leaf).
  """

  kind: str
  kernel: str
  bias: str | None
  kernel_index: int
  bias_index: int | None
  site: tuple[int, ...]
  fan_in_axes: tuple[int, ...]
  fan_out_axes: tuple[int, ...]
  operand_shape: tuple[int, ...]
  view: tuple = ()


def _is_literal(v) -> bool:
  return type(v).__name__ == "Literal"


def _has_layer_op(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _LAYER_OPS:
      return True
    if any(_has_layer_op(j) for j in sub_jaxprs(eqn.params)):
      return True
  return False


def _view_step(eqn):
  """What inverting one view op needs: (name, input shape, input dtype, params)."""
  aval = eqn.invars[0].aval
  return (eqn.primitive.name, tuple(aval.shape), aval.dtype, dict(eqn.params))


def _invert_view(x, view):
  """The leaf-shaped array whose view (the recorded ops) is `x`."""
  for name, shape, dtype, params in reversed(view):
    if name == "convert_element_type":
      x = x.astype(dtype)
    elif name == "transpose":
      x = jnp.transpose(x, tuple(int(i) for i in np.argsort(params["permutation"])))
    elif name == "rev":
      x = jax.lax.rev(x, tuple(params["dimensions"]))
    elif name in ("reshape", "squeeze", "expand_dims"):
      x = jnp.reshape(x, shape)
  return x


def _layer_axes(eqn, side: int):
  """(kind, fan_in axes, fan_out axes) of the parameter operand `side` of a conv / dot."""
  shape = tuple(eqn.invars[side].aval.shape)
  if eqn.primitive.name == "conv_general_dilated":
    out_axis = eqn.params["dimension_numbers"].rhs_spec[0]
    return "conv", tuple(a for a in range(len(shape)) if a != out_axis), (out_axis,)
  (contract, batch) = eqn.params["dimension_numbers"]
  if batch[side]:
    return None
  fan_in = tuple(int(a) for a in contract[side])
  return "dense", fan_in, tuple(a for a in range(len(shape)) if a not in fan_in)


def _walk(jaxpr, origin: dict, path: tuple, found: list, names: list) -> None:
  """Appends the layers of `jaxpr` to `found` in execution order.

  `origin` maps a variable to `(leaf index, view, broadcast)` when it is a linear view of a
  parameter leaf (`broadcast`: a `broadcast_in_dim` is among the ops: a bias, not a kernel).
  """
  pending = {}  # layer output var -> index in `found`, until its first use is seen
  for k, eqn in enumerate(jaxpr.eqns):
    here, name = (*path, k), eqn.primitive.name
    src = [None if _is_literal(v) else origin.get(v) for v in eqn.invars]
    used = [v for v in eqn.invars if not _is_literal(v) and v in pending]
    if used:
      i = pending.pop(used[0])
      for v in used[1:]:
        pending.pop(v, None)
      other = [s for v, s in zip(eqn.invars, src) if _is_literal(v) or v is not used[0]]
      if name == "add" and len(eqn.invars) == 2 and len(other) == 1 and other[0] is not None:
        found[i] = dataclasses.replace(
          found[i], bias=names[other[0][0]], bias_index=other[0][0], site=here
        )
    if name in _BIAS_VIEW_OPS and len(eqn.invars) == 1 and src[0] is not None:
      leaf, view, bcast = src[0]
      origin[eqn.outvars[0]] = (
        leaf,
        (*view, _view_step(eqn)),
        bcast or name not in _VIEW_OPS,
      )
      continue
    if name in _LAYER_OPS:
      sides = [s for s in (0, 1) if src[s] is not None]
      if name == "conv_general_dilated":
        sides = [1] if sides == [1] else []
      if len(sides) == 1 and not src[sides[0]][2]:
        side = sides[0]
        axes = _layer_axes(eqn, side)
        leaf, view, _ = src[side]
        if axes is None:
          raise ValueError(
            f"LSUV: parameter {names[leaf]!r} enters a dot_general with batch dimensions on "
            "the parameter (a batched matmul), which is not a conv / dense layer LSUV can "
            "rescale."
          )
        kind, fan_in, fan_out = axes
        found.append(
          LSUVLayer(
            kind=kind,
            kernel=names[leaf],
            bias=None,
            kernel_index=leaf,
            bias_index=None,
            site=here,
            fan_in_axes=fan_in,
            fan_out_axes=fan_out,
            operand_shape=tuple(eqn.invars[side].aval.shape),
            view=view,
          )
        )
        pending[eqn.outvars[0]] = len(found) - 1
      continue
    subs = list(sub_jaxprs(eqn.params))
    if not subs:
      continue
    if name in INLINE_CALLS and INLINE_CALLS[name] in eqn.params:
      body = eqn.params[INLINE_CALLS[name]]
      body = getattr(body, "jaxpr", body)
      offset = len(eqn.invars) - len(body.invars)
      inner = {bv: src[offset + j] for j, bv in enumerate(body.invars) if src[offset + j]}
      _walk(body, inner, here, found, names)
      for ov, bv in zip(eqn.outvars, body.outvars):
        if not _is_literal(bv) and bv in inner:
          origin[ov] = inner[bv]
    elif any(s is not None for s in src) and any(_has_layer_op(j) for j in subs):
      leaf = next(s for s in src if s is not None)[0]
      raise ValueError(f"{_SCAN_HINT} Parameter {names[leaf]!r} enters a {name!r} equation.")


def lsuv_layers(loss_fn: Callable, params: PyTree, batch: PyTree) -> list[LSUVLayer]:
  """The layers LSUV rescales, in the order `loss_fn(params, batch)` runs them.

  Read from the jaxpr of the loss (see the module docstring); nothing is run.

  Raises:
    ValueError: a layer inside `lax.scan` / `nn.scan` (scanned layouts), a kernel used by
      several layers, a batched dot on a parameter, or no conv / dense layer at all.
  """
  return _find_layers(loss_fn, params, batch)[1]


def _find_layers(loss_fn, params, batch):
  """`(closed jaxpr of the loss, layers)`; see `lsuv_layers`."""
  check_jaxpr_internals()
  with_path = jax.tree_util.tree_leaves_with_path(params)
  names = ["/".join(leaves.path_names(p)) for p, _ in with_path]
  for name, (p, x) in zip(names, with_path):
    if leaves.is_stacked(p) and jnp.ndim(x) >= 1:
      raise ValueError(f"{_SCAN_HINT} Stacked leaf: {name!r}.")
  closed = jax.make_jaxpr(loss_fn)(params, batch)
  invars = closed.jaxpr.invars[: len(names)]
  found: list[LSUVLayer] = []
  _walk(closed.jaxpr, {v: (i, (), False) for i, v in enumerate(invars)}, (), found, names)
  if not found:
    raise ValueError(
      "LSUV found no conv / dense layer in loss_fn: no conv_general_dilated or dot_general "
      "takes a parameter leaf as its weight."
    )
  users: dict[int, int] = {}
  for layer in found:
    users[layer.kernel_index] = users.get(layer.kernel_index, 0) + 1
  shared = sorted(names[i] for i, n in users.items() if n > 1)
  if shared:
    raise ValueError(
      f"LSUV: kernel(s) {shared} are used by several layers (weight sharing, or a module "
      "called twice); LSUV rescales each layer's own kernel once, so it cannot initialise them."
    )
  return closed, found


# ------------------------------------------------------------------ evaluating the layers


def _evaluate(jaxpr, consts, args, path, sites, prefixes, out):
  env = {}

  def read(v):
    return v.val if _is_literal(v) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for k, eqn in enumerate(jaxpr.eqns):
    here = (*path, k)
    inv = [read(v) for v in eqn.invars]
    if here in prefixes:
      body = eqn.params[INLINE_CALLS[eqn.primitive.name]]
      body_consts = getattr(body, "consts", ())
      body = getattr(body, "jaxpr", body)
      outs = _evaluate(
        body, body_consts, inv[len(inv) - len(body.invars) :], here, sites, prefixes, out
      )
    else:
      outs = bind_equation(eqn, inv)
    if here in sites:
      out[here] = outs[0]
    for v, o in zip(eqn.outvars, outs):
      if type(v).__name__ != "DropVar":
        env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _make_stats(closed, layers):
  """Jitted `(param leaves, batch leaves) -> (std [L], mean [L], mean loss)` of every layer's
  output (unbiased std over all its elements, in float32), from the loss's jaxpr `closed`."""
  sites = [layer.site for layer in layers]
  prefixes = {s[:i] for s in sites for i in range(1, len(s))}

  @jax.jit
  def stats(param_leaves, batch_leaves):
    out = {}
    losses = _evaluate(
      closed.jaxpr, closed.consts, [*param_leaves, *batch_leaves], (), set(sites), prefixes, out
    )
    ys = [jnp.asarray(out[s], jnp.float32) for s in sites]
    std = jnp.stack([jnp.std(y, ddof=1) for y in ys])
    mean = jnp.stack([jnp.mean(y) for y in ys])
    return std, mean, jnp.mean(jnp.asarray(losses[0], jnp.float32))

  return stats


def _orthonormal(key, layer: LSUVLayer, dtype):
  """A random orthonormal `(fan_in, fan_out)` matrix laid out as the kernel leaf."""
  shape = layer.operand_shape
  order = (*layer.fan_in_axes, *layer.fan_out_axes)
  fan_in = math.prod(shape[a] for a in layer.fan_in_axes)
  fan_out = math.prod(shape[a] for a in layer.fan_out_axes)
  q = jax.nn.initializers.orthogonal()(key, (fan_in, fan_out), jnp.float32)
  q = jnp.reshape(q, tuple(shape[a] for a in order))
  q = jnp.transpose(q, tuple(int(i) for i in np.argsort(order)))
  return _invert_view(q, layer.view).astype(dtype)


@register("lsuv", config_cls=LSUVConfig)
def lsuv(
  loss_fn: Callable,
  params: PyTree,
  data: Any,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """LSUV (Mishkin & Matas, 2016): each layer's output rescaled to unit variance, in order.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses; its jaxpr gives the layers.
    params: initial parameters θ0 (a pytree; no `nn.scan` stacks).
    data: an iterable of batches; LSUV uses the first batch only (as the package's
      `lsuv_with_dataloader`).
    config: None (the package's defaults), `LSUVConfig`, dict or ConfigDict.
    progress: tqdm progress bar over the layers.
    mesh: optional `jax.sharding.Mesh` with a `data` axis: the batch is sharded over it and
      the params replicated (data parallel, GSPMD; the batch size must divide evenly).

  Returns:
    `InitResult` with the rescaled params; `scales` = the factor applied to each leaf
    (`params = apply_scales(θ0, scales)`, 1 for every leaf but the kernels) when
    `orthonormal=False`, None with the orthonormal pre-initialisation (the kernels are
    replaced, not scaled). `history`, one row per layer in execution order: `layer` (kernel
    path), `std_before` (after the orthonormal step), `std_after`, `mean_after`, `iterations`
    (corrections applied) and `converged` (`|std_after − target_std| ≤ tol`).

  Raises:
    ValueError: bad input (a batch of fewer than 2 examples, an unknown config key, a
      scanned layout, ...); `nio_jax.NonFiniteError` when a layer's output or the loss is
      NaN / inf (`.step` = the layer index, `.last_good` = the params before that layer).
  """
  cfg = LSUVConfig.create(config)
  checks.check_params(params)
  first, _ = peek(data)
  b = checks.batch_size(first)
  if b < 2:
    raise ValueError(
      f"LSUV needs a batch of at least 2 examples (the output variance is taken over the "
      f"batch); the first batch has {b}."
    )
  check_search_inputs(loss_fn, params, [first], mesh=mesh)
  closed, layers = _find_layers(loss_fn, params, first)
  (params,), (first,) = shard_search(mesh, (params,), [first])
  flat, treedef = jax.tree_util.tree_flatten(params)
  flat = [jnp.asarray(x) for x in flat]
  batch_leaves = jax.tree_util.tree_leaves(first)
  kernel_set = {layer.kernel_index for layer in layers}
  kinds = leaves.leaf_kinds_for(loss_fn, params)
  missed = [
    "/".join(leaves.path_names(p))
    for i, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    if i not in kernel_set and kinds.kind(p) == leaves.KERNEL
  ]
  if missed:
    warnings.warn(
      f"LSUV: kernel leaves {missed} are not the weight of any conv / dense op in loss_fn; "
      "they are left unchanged.",
      stacklevel=2,
    )

  if cfg.orthonormal:
    base = jax.random.PRNGKey(cfg.seed)
    for l, layer in enumerate(layers):
      k = layer.kernel_index
      flat[k] = _orthonormal(jax.random.fold_in(base, l), layer, flat[k].dtype)
      if layer.bias_index is not None:
        flat[layer.bias_index] = jnp.zeros_like(flat[layer.bias_index])
  base_leaves = list(flat)
  factors = [1.0] * len(flat)

  def result(state, hist):
    leaves_, factors_ = state
    scales = None
    if not cfg.orthonormal:
      scales = jax.tree_util.tree_unflatten(treedef, [jnp.float32(f) for f in factors_])
    return InitResult(
      params=jax.tree_util.tree_unflatten(treedef, leaves_),
      scales=scales,
      history={k: np.asarray(v) for k, v in hist.items()},
      method="lsuv",
      config=cfg.to_dict(),
    )

  stats = _make_stats(closed, layers)
  hist = {k: [] for k in ("layer", "std_before", "std_after", "mean_after", "iterations")}
  hist["converged"] = []

  def measure(l):
    std, mean, loss = stats(flat, batch_leaves)
    s, m = float(std[l]), float(mean[l])
    if not (math.isfinite(s) and math.isfinite(m)):
      raise errors.NonFiniteError(
        f"LSUV: the output of layer {l} (kernel {layers[l].kernel!r}) is NaN or inf on the "
        f"batch (std {s}, mean {m}); check the params and the inputs. error.last_good holds "
        "the params before this layer.",
        step=l,
        last_good=result(good, hist),
      )
    return s, m, float(loss)

  good = (list(flat), list(factors))
  loss = float("nan")
  for l in progress_bar(range(len(layers)), len(layers), "lsuv", progress):
    layer, k = layers[l], layers[l].kernel_index
    good = (list(flat), list(factors))
    std, mean, loss = measure(l)
    std_before, attempts = std, 0
    if std == 0.0 and abs(std - cfg.target_std) > cfg.tol:
      raise ValueError(
        f"LSUV: the output of layer {l} (kernel {layer.kernel!r}) is constant on the batch "
        "(std 0: a zero kernel or a dead input), so no rescaling of the kernel can give it "
        "unit variance. Use orthonormal=True, or re-initialise that layer."
      )
    while abs(std - cfg.target_std) > cfg.tol:
      factors[k] *= float(np.float32(cfg.target_std / (std + STD_EPS)))
      flat[k] = (jnp.float32(factors[k]) * base_leaves[k]).astype(base_leaves[k].dtype)
      std, mean, loss = measure(l)
      attempts += 1
      if attempts > cfg.max_iter:
        break
    hist["layer"].append(layer.kernel)
    hist["std_before"].append(std_before)
    hist["std_after"].append(std)
    hist["mean_after"].append(mean)
    hist["iterations"].append(attempts)
    hist["converged"].append(abs(std - cfg.target_std) <= cfg.tol)
  if not math.isfinite(loss):
    raise errors.NonFiniteError(
      f"LSUV: the loss is NaN or inf ({loss}) with the rescaled params; check loss_fn and "
      "the labels. error.last_good holds those params.",
      step=len(layers),
      last_good=result((flat, factors), hist),
    )
  return result((flat, factors), hist)
