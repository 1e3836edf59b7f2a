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
  (so at most `max_iter + 1` corrections, as in the package); the bias is never rescaled.
  The tolerance is the package's, on the std (`tol_on="std"`: at `tol=0.1` the variance
  ends in [0.81, 1.21]). The paper's rule (Algorithm 1, `while |Var(B_L) − 1.0| ≥ Tol_var`)
  is on the variance: `tol_on="variance"` stops once `|std² − target_std²| < tol` (at
  `tol=0.1`: variance in (0.9, 1.1), std in (0.949, 1.049)). A layer still off target after
  the last correction is marked `converged=False` and warned about (`UserWarning` at the
  caller's line, naming the layer, its std and the corrections);
* the orthonormal pre-initialisation (`do_orthonorm=True` by default) replaces each kernel,
  reshaped to a `(fan_in, fan_out)` matrix, by a random orthonormal one (gain 1, as
  `torch.nn.init.orthogonal_`) and sets its bias to 0, for every layer before the loop starts.

Layers and their order come from the model's execution, not from parameter names: the loss
function is traced once to a jaxpr (`jax.make_jaxpr(loss_fn)(params, batch)`; when `loss_fn`
has a `forward` attribute, as the Flax adapters attach, `loss_fn.forward(params, batch) ->
model outputs` is traced instead, so a batch needs only the inputs), and every
`conv_general_dilated` / `dot_general` equation one of whose operands is a parameter leaf
(directly or through reshapes, transposes, dtype casts) is a layer, in jaxpr order. When the
very next use of its output adds the layer's *own bias*, that sum is the layer's output and
that leaf its bias: a leaf of the same module (the kernel's parent path), named like a bias
("bias" in its name, or "b") and with one element per output feature. Anything else added
there (a position embedding of the enclosing module, `x @ W + self.param("pos", ...)`) is
not the bias: it is neither zeroed nor part of the measured output. Layer outputs are then
computed by re-evaluating the jaxpr with the current params and recording those values (one
compiled function for all layers). This works for any `loss_fn(params, batch)`, Flax or not,
and sees through `jit`, `remat` and custom-derivative calls. A stochastic loss
(`loss_fn.rng_seed`, dropout on) has its first batch keyed once (`nio_jax.stochastic`), so
the layers are found and measured with the same dropout masks.

Supported: dense layers (`nn.Dense`, `nn.DenseGeneral`, plain `x @ W`), convolutions of any
dimension, stride, padding, dilation and feature grouping, and batch norm (the layers are
measured the way `loss_fn` runs the model: `nio_jax.flax_utils.linen_loss_fn(...,
batch_stats=)` uses batch statistics; the package puts the model in eval mode, i.e. running
statistics, so pass a loss that applies the model with `train=False` to reproduce it).
Not supported (a clear `ValueError`): layers inside `lax.scan` / `nn.scan` (the models'
`stageN_scan` layouts: build them with `scan=False`), a kernel used by several layers
(weight sharing), a kernel that also reaches an *earlier* layer's output by another use (a
tied embedding: `nn.Embed`'s lookup feeds the first layers and `Embed.attend` is the output
projection; rescaling it for the last layer would silently change the earlier layers after
they were measured, e.g. a std recorded as 1.0 that is 1.51), and dot products with batch
dimensions on the parameter. An error rather than a joint treatment, because no single
kernel scale can serve both uses: LSUV's premise is that a layer's scale leaves the layers
before it alone. The fix is named in the message: `exclude=("embed/embedding",)` (the leaf is
then no layer: neither orthonormalised nor rescaled) or untie the projection.

Differences from the package:

* every correction rescales the layer being measured. The package resets its
  `counter_to_apply_correction` once per layer, not once per attempt, so from the second
  correction of any layer after the first one on it rescales the *first* layer instead (in
  the package's default, orthonormal kernels with zero biases, one correction per layer is
  exact for a conv / dense layer, and the two agree);
* attention is not one unit (the package scales `nn.MultiheadAttention` by its output
  projection only; here the query / key / value / output projections are four dense layers);
* a layer whose output is constant (deviation 0) raises instead of having its kernel
  multiplied by 1e8 (the message depends on `orthonormal`: with it on, the input carries no
  variation; with it off, the kernel may be zero);
* a layer that does not converge warns (the package logs nothing unless `verbose`);
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

from nio_jax import checks, errors, jaxpr_sites, leaves, method_config, stochastic
from nio_jax.jaxpr_rewrites import bind_equation, check_jaxpr_internals, sub_jaxprs
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


TOL_ON = ("std", "variance")


@dataclasses.dataclass(frozen=True)
class LSUVConfig:
  """LSUV hyper-parameters; the defaults are those of the `lsuv` 0.3.0 package.

  Attributes:
    target_std: the standard deviation each layer's output is brought to (the package's
      `needed_std`, 1.0: unit variance).
    tol: the tolerance; what it bounds is `tol_on` (`std_tol`, 0.1).
    tol_on: "std" (default, the package's rule): a layer is done when
      `|std − target_std| ≤ tol`, so at `tol=0.1` its variance ends in [0.81, 1.21].
      "variance" (the paper's rule, Algorithm 1: `|Var(B_L) − 1.0| < Tol_var`): done when
      `|std² − target_std²| < tol`, so at `tol=0.1` the variance ends in (0.9, 1.1) and the
      std in (0.949, 1.049).
    max_iter: the package's `max_attempts` (10): the loop stops once more than `max_iter`
      corrections were made, so a layer gets at most `max_iter + 1`.
    orthonormal: replace every kernel by a random orthonormal one and zero its bias first
      (`do_orthonorm`, True, as in the paper).
    seed: PRNG seed of the orthonormal draw (layer `l` uses `fold_in(PRNGKey(seed), l)`).
    exclude: kernel leaf paths ("embed/embedding") LSUV leaves alone: not a layer, neither
      orthonormalised nor rescaled (e.g. a tied embedding, which LSUV refuses otherwise).
  """

  target_std: float = 1.0
  tol: float = 0.1
  max_iter: int = 10
  orthonormal: bool = True
  seed: int = 0
  tol_on: str = "std"
  exclude: tuple[str, ...] = ()

  @classmethod
  def create(cls, config=None, **overrides) -> LSUVConfig:
    """From None (defaults), an LSUVConfig, a dict or an ml_collections ConfigDict."""
    values = method_config.config_values(cls, config, overrides, "LSUV")
    if isinstance(values.get("exclude"), str):
      values["exclude"] = (values["exclude"],)
    elif isinstance(values.get("exclude"), (list, tuple)):
      values["exclude"] = tuple(values["exclude"])
    cfg = cls(**values)
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
    checks.check_choice("tol_on", self.tol_on, TOL_ON)
    if not isinstance(self.exclude, tuple) or not all(isinstance(e, str) for e in self.exclude):
      raise TypeError(
        f"exclude must be a tuple of leaf paths such as ('embed/embedding',), got {self.exclude!r}."
      )

  def within(self, std: float) -> bool:
    """Whether a layer whose output has deviation `std` is done (`tol_on`)."""
    if self.tol_on == "variance":
      return abs(std * std - self.target_std * self.target_std) < self.tol
    return abs(std - self.target_std) <= self.tol

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


@dataclasses.dataclass(frozen=True)
class _LeafInfo:
  """What the walker needs to know about the parameter leaves (flat order)."""

  names: list  # "/"-joined paths, for messages
  parts: list  # path component tuples (NNX-aware, `leaves.path_names`)
  sizes: list  # element counts
  excluded: frozenset  # leaf indices of `LSUVConfig.exclude`


def _fan_out_size(layer: LSUVLayer) -> int:
  return math.prod(layer.operand_shape[a] for a in layer.fan_out_axes)


def _is_bias_of(info: _LeafInfo, layer: LSUVLayer, leaf: int) -> bool:
  """Whether parameter `leaf`, added to the output of `layer`, is that layer's own bias: owned
  by the same module (the kernel's parent path), named like a bias ("bias" in its name, or
  "b" as in Haiku / hand-written layers) and with one element per output feature. Anything
  else added there (a position embedding, a learned offset of the enclosing module) is not
  the layer's bias: the orthonormal pre-init leaves it alone."""
  own = info.parts[leaf]
  name = own[-1].lower() if own else ""
  return (
    leaf != layer.kernel_index
    and own[:-1] == info.parts[layer.kernel_index][:-1]
    and ("bias" in name or name == "b")
    and info.sizes[leaf] == _fan_out_size(layer)
  )


class _LayerWalker(jaxpr_sites.Walker):
  """Finds the layers of a jaxpr in execution order (`found`), reading it only.

  Tags: a `LeafRef` marks a linear view of a parameter leaf (a `broadcast_in_dim` among its
  views makes it a bias, not a kernel); a frozenset marks a value that parameter leaves reach
  through a use *other* than being a layer's kernel (an embedding lookup, a norm scale, ...).
  `site_taint[i]` is that set at the output of layer `found[i]` (it finds tied weights).
  """

  views = _BIAS_VIEW_OPS
  evaluate = False

  def __init__(self, info: _LeafInfo):
    self.info = info
    self.found: list[LSUVLayer] = []
    self.site_taint: list[frozenset] = []
    self.pending: list[dict] = []  # per jaxpr walked: layer output var -> index in `found`

  def walk(self, jaxpr, consts, args, tags, path=()):
    self.pending.append({})  # a layer's output waits for its first use in its own jaxpr
    try:
      return super().walk(jaxpr, consts, args, tags, path)
    finally:
      self.pending.pop()

  def equation(self, eqn, inv, in_tags, here):
    """The first use of a layer's output: when it adds the layer's own bias, that sum is the
    layer's output; any other equation goes the walker's way."""
    pending = self.pending[-1]
    used = [v for v in eqn.invars if not jaxpr_sites.is_literal(v) and v in pending]
    if used:
      i = pending.pop(used[0])
      for v in used[1:]:
        pending.pop(v, None)
      other = [
        t for v, t in zip(eqn.invars, in_tags) if jaxpr_sites.is_literal(v) or v is not used[0]
      ]
      if (
        eqn.primitive.name == "add"
        and len(eqn.invars) == 2
        and len(other) == 1
        and isinstance(other[0], jaxpr_sites.LeafRef)
        and _is_bias_of(self.info, self.found[i], other[0].leaf)
      ):
        self.found[i] = dataclasses.replace(
          self.found[i], bias=self.info.names[other[0].leaf], bias_index=other[0].leaf, site=here
        )
        tin = _taint_in(in_tags)
        self.site_taint[i] = tin
        return [None], [tin or None]
    return super().equation(eqn, inv, in_tags, here)

  def other(self, eqn, inv, in_tags, here):
    """A layer (a conv / dot with a parameter leaf as its weight), a refused scan, or a use
    that taints its outputs with the leaves it reads."""
    info, name = self.info, eqn.primitive.name
    src = [t if isinstance(t, jaxpr_sites.LeafRef) else None for t in in_tags]
    tin = _taint_in(in_tags)
    if name in _LAYER_OPS:
      sides = [s for s in (0, 1) if src[s] is not None]
      if name == "conv_general_dilated":
        sides = [1] if sides == [1] else []
      if (
        len(sides) == 1
        and not _is_broadcast(src[sides[0]])
        and src[sides[0]].leaf not in info.excluded
      ):
        side = sides[0]
        axes = _layer_axes(eqn, side)
        leaf = src[side].leaf
        if axes is None:
          raise ValueError(
            f"LSUV: parameter {info.names[leaf]!r} enters a dot_general with batch dimensions "
            "on the parameter (a batched matmul), which is not a conv / dense layer LSUV can "
            f"rescale. Leave it out with exclude=({info.names[leaf]!r},)."
          )
        kind, fan_in, fan_out = axes
        self.found.append(
          LSUVLayer(
            kind=kind,
            kernel=info.names[leaf],
            bias=None,
            kernel_index=leaf,
            bias_index=None,
            site=here,
            fan_in_axes=fan_in,
            fan_out_axes=fan_out,
            operand_shape=tuple(eqn.invars[side].aval.shape),
            view=tuple(_view_step(e) for e in src[side].chain),
          )
        )
        self.site_taint.append(tin)
        self.pending[-1][eqn.outvars[0]] = len(self.found) - 1
        return [None], [tin or None]
    subs = list(sub_jaxprs(eqn.params))
    if subs and any(s is not None for s in src) and any(_has_layer_op(j) for j in subs):
      leaf = next(s for s in src if s is not None).leaf
      raise ValueError(f"{_SCAN_HINT} Parameter {info.names[leaf]!r} enters a {name!r} equation.")
    # Any other use: the parameter leaves it reads reach its outputs by a non-layer path.
    out = tin.union(s.leaf for s in src if s is not None)
    n = len(eqn.outvars)
    return [None] * n, [out or None] * n


def _taint_in(tags) -> frozenset:
  return frozenset().union(*(t for t in tags if isinstance(t, frozenset)))


def _is_broadcast(ref) -> bool:
  """Whether a `broadcast_in_dim` is among a leaf's views (a bias, not a kernel)."""
  return any(e.primitive.name not in _VIEW_OPS for e in ref.chain)


def lsuv_layers(
  loss_fn: Callable, params: PyTree, batch: PyTree, *, exclude: tuple[str, ...] = ()
) -> list[LSUVLayer]:
  """The layers LSUV rescales, in the order `loss_fn(params, batch)` runs them.

  Read from the jaxpr (see the module docstring); nothing is run. When `loss_fn` has a
  `forward` attribute (the Flax adapters attach `loss_fn.forward(params, batch) -> model
  outputs`), that is traced instead of the loss, so the batch needs no labels; a stochastic
  loss's batch is keyed as LSUV keys it (`nio_jax.stochastic.keyed_batch`). `exclude`: kernel
  paths left out (`LSUVConfig.exclude`).

  Raises:
    ValueError: a layer inside `lax.scan` / `nn.scan` (scanned layouts), a kernel used by
      several layers or tied to an earlier layer's input, a batched dot on a parameter, an
      unknown `exclude` path, or no conv / dense layer at all.
  """
  fn = _traced_fn(loss_fn)
  return _find_layers(fn, params, stochastic.keyed_batch(loss_fn, batch), exclude)[1]


def _traced_fn(loss_fn: Callable) -> Callable:
  """`loss_fn.forward` when the loss has one (LSUV needs only the inputs), else `loss_fn`."""
  forward = getattr(loss_fn, "forward", None)
  if forward is None:
    return loss_fn
  if not callable(forward):
    raise TypeError(
      f"loss_fn.forward must be a function (params, batch) -> model outputs, got "
      f"{type(forward).__name__}."
    )
  return forward


def _find_layers(fn, params, batch, exclude=()):
  """`(closed jaxpr of fn, layers)`; see `lsuv_layers`."""
  check_jaxpr_internals()
  with_path = jax.tree_util.tree_leaves_with_path(params)
  parts = [tuple(leaves.path_names(p)) for p, _ in with_path]
  names = ["/".join(x) for x in parts]
  for name, (p, x) in zip(names, with_path):
    if leaves.is_stacked(p) and jnp.ndim(x) >= 1:
      raise ValueError(f"{_SCAN_HINT} Stacked leaf: {name!r}.")
  unknown = sorted(set(exclude) - set(names))
  if unknown:
    raise ValueError(f"LSUV: exclude={unknown} names no parameter leaf; the leaves are {names}.")
  info = _LeafInfo(
    names=names,
    parts=parts,
    sizes=[int(np.size(x)) for _, x in with_path],
    excluded=frozenset(names.index(e) for e in exclude),
  )
  closed = jax.make_jaxpr(fn)(params, batch)
  invars = closed.jaxpr.invars[: len(names)]
  walker = _LayerWalker(info)
  tags = [jaxpr_sites.LeafRef(i) for i in range(len(invars))]
  tags += [None] * (len(closed.jaxpr.invars) - len(invars))
  walker.walk(closed.jaxpr, closed.consts, [None] * len(tags), tags)
  found, site_taint = walker.found, walker.site_taint
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
      "called twice); LSUV rescales each layer's own kernel once, so it cannot initialise "
      f"them. Untie the weights, or leave them out with exclude={tuple(shared)!r}."
    )
  for l, layer in enumerate(found):
    earlier = [found[j].kernel for j in range(l) if layer.kernel_index in site_taint[j]]
    if earlier:
      raise ValueError(
        f"LSUV: kernel {layer.kernel!r} is the weight of layer {l} and also feeds the output "
        f"of earlier layer(s) {earlier} by another use (a tied embedding: nn.Embed's lookup "
        "and Embed.attend as the output projection, or any other weight sharing). Rescaling "
        "it for layer "
        f"{l} would change those layers' outputs after LSUV measured them (their recorded "
        "std would be wrong). Leave it out with "
        f"exclude=({layer.kernel!r},) (it is then neither orthonormalised nor rescaled), or "
        "untie the output projection (a separate nn.Dense)."
      )
  return closed, found


# ------------------------------------------------------------------ evaluating the layers


class _Recorder(jaxpr_sites.Walker):
  """Evaluates a jaxpr, keeping the output of the equations at the addresses `sites` (the
  calls on their way, `prefixes`, walked inside) in `out`."""

  def __init__(self, sites, prefixes):
    self.sites, self.prefixes, self.out = sites, prefixes, {}

  def equation(self, eqn, inv, in_tags, here):
    if here in self.prefixes:
      outs, _ = self.call(eqn, inv, in_tags, here)
    else:
      outs = bind_equation(eqn, inv)
    if here in self.sites:
      self.out[here] = outs[0]
    return outs, [None] * len(outs)


def _make_stats(closed, layers):
  """Jitted `(param leaves, batch leaves) -> (std [L], mean [L], mean of the first output,
  all outputs finite)`: the statistics of every layer's output (unbiased std over all its
  elements, in float32), from the jaxpr `closed` of the loss or of `loss_fn.forward`."""
  sites = [layer.site for layer in layers]
  prefixes = {s[:i] for s in sites for i in range(1, len(s))}

  @jax.jit
  def stats(param_leaves, batch_leaves):
    recorder = _Recorder(set(sites), prefixes)
    args = [*param_leaves, *batch_leaves]
    outs, _ = recorder.walk(closed.jaxpr, closed.consts, args, [None] * len(args))
    out = recorder.out
    ys = [jnp.asarray(out[s], jnp.float32) for s in sites]
    std = jnp.stack([jnp.std(y, ddof=1) for y in ys])
    mean = jnp.stack([jnp.mean(y) for y in ys])
    floats = [o for o in outs if jnp.issubdtype(jnp.result_type(o), jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in floats] or [jnp.bool_(True)]))
    first = jnp.mean(jnp.asarray(floats[0], jnp.float32)) if floats else jnp.float32(0.0)
    return std, mean, first, finite

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


def _check_forward(loss_fn, forward, params, first, mesh) -> None:
  """The input checks of `check_search_inputs` for `loss_fn.forward`: it traces on the first
  batch (no labels needed) and returns an array with the batch axis first."""
  b = checks.batch_size(first)
  seen = []

  def probe(p, batch):
    out = forward(p, batch)
    seen.append(jax.tree_util.tree_map(lambda o: (tuple(np.shape(o)), jnp.result_type(o)), out))
    return jnp.zeros((checks.batch_size(batch),), jnp.float32)

  probe.rng_seed = getattr(loss_fn, "rng_seed", None)
  try:
    check_search_inputs(probe, params, [first], mesh=mesh)
  except errors.LossFnError as e:
    text = str(e).replace("loss_fn(params, batch) failed", "loss_fn.forward(params, batch) failed")
    raise errors.LossFnError(
      f"LSUV runs loss_fn.forward (the model's outputs from the inputs only; no labels are "
      f"needed). {text}"
    ) from (e.__cause__ or e)
  outs = jax.tree_util.tree_leaves(seen[-1], is_leaf=lambda x: isinstance(x, tuple)) if seen else []
  shape, dtype = outs[0] if outs else ((), None)
  if not outs or not shape or shape[0] != b or not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(
      "loss_fn.forward(params, batch) must return the model's outputs: a floating-point array "
      f"with the batch axis first ({b}, ...); got {seen[-1] if seen else None}."
    )


def _constant_output_message(l: int, layer: LSUVLayer, orthonormal: bool) -> str:
  head = (
    f"LSUV: the output of layer {l} (kernel {layer.kernel!r}) is constant on the batch (std "
    "0), so no rescaling of its kernel can give it the target deviation. "
  )
  if orthonormal:
    return head + (
      "Its kernel is already a random orthonormal matrix (orthonormal=True), so the layer's "
      "input carries no variation: a constant or all-zero batch, or every unit before it dead "
      "(e.g. ReLU of all-negative values). Check the batch (use real, varied inputs) and the "
      "layers before it."
    )
  return head + (
    "The kernel is zero or the layer's input is constant. Use orthonormal=True (a random "
    "orthonormal kernel first), re-initialise that layer, or check the batch."
  )


@register(
  "lsuv",
  config_cls=LSUVConfig,
  label="LSUV",
  seeded=("real",),  # the run's seed draws the orthonormal kernels
  searches=True,  # its layer-by-layer passes over the first batch
)
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
      When it has a `forward` attribute (`loss_fn.forward(params, batch) -> model outputs`,
      attached by `nio_jax.flax_utils.linen_loss_fn` / `nnx_loss_fn`), that is run instead,
      so the batch needs only the inputs (a dict without labels, a bare array, `(x,)`). A
      stochastic loss (`loss_fn.rng_seed`, dropout) has the first batch keyed once
      (`nio_jax.stochastic`): the layers are found and measured with the same dropout masks.
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
    (corrections applied) and `converged` (within `tol`, see `LSUVConfig.tol_on`).

  Raises:
    ValueError: bad input (a batch of fewer than 2 examples, an unknown config key, a
      scanned layout, tied weights, a layer with constant output, ...);
      `nio_jax.NonFiniteError` when a layer's output or the loss is NaN / inf (`.step` = the
      layer index, `.last_good` = the params before that layer).

  Warns:
    UserWarning: a layer that did not reach the tolerance after `max_iter + 1` corrections
      (named, with its std and the corrections; `converged` is False in the history).
  """
  cfg = LSUVConfig.create(config)
  checks.check_params(params)
  first, _ = peek(data)
  # A stochastic loss: key the first batch once, so that the layers are found and measured
  # on the same keyed batch (attaching is idempotent in the checks below).
  first = stochastic.keyed_batch(loss_fn, first)
  b = checks.batch_size(first)
  if b < 2:
    raise ValueError(
      f"LSUV needs a batch of at least 2 examples (the output variance is taken over the "
      f"batch); the first batch has {b}."
    )
  fn = _traced_fn(loss_fn)
  if fn is loss_fn:
    check_search_inputs(loss_fn, params, [first], mesh=mesh)
  else:
    _check_forward(loss_fn, fn, params, first, mesh)
  closed, layers = _find_layers(fn, params, first, cfg.exclude)
  (params,), (first,) = shard_search(mesh, (params,), [first])
  flat, treedef = jax.tree_util.tree_flatten(params)
  flat = [jnp.asarray(x) for x in flat]
  batch_leaves = jax.tree_util.tree_leaves(first)
  kernel_set = {layer.kernel_index for layer in layers}
  kinds = leaves.leaf_kinds_for(loss_fn, params)
  missed = [
    name
    for i, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    if i not in kernel_set
    and kinds.kind(p) == leaves.KERNEL
    and (name := "/".join(leaves.path_names(p))) not in cfg.exclude
  ]
  if missed:
    warnings.warn(
      f"LSUV: kernel leaves {missed} are not the weight of any conv / dense op in loss_fn; "
      "they are left unchanged.",
      stacklevel=errors.user_stacklevel(),
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
    std, mean, out_mean, finite = stats(flat, batch_leaves)
    s, m = float(std[l]), float(mean[l])
    if not (math.isfinite(s) and math.isfinite(m)):
      raise errors.NonFiniteError(
        f"LSUV: the output of layer {l} (kernel {layers[l].kernel!r}) is NaN or inf on the "
        f"batch (std {s}, mean {m}); check the params and the inputs. error.last_good holds "
        "the params before this layer.",
        step=l,
        last_good=result(good, hist),
      )
    return s, m, (float(out_mean), bool(finite))

  good = (list(flat), list(factors))
  out = (float("nan"), False)
  for l in progress_bar(range(len(layers)), len(layers), "lsuv", progress):
    layer, k = layers[l], layers[l].kernel_index
    good = (list(flat), list(factors))
    std, mean, out = measure(l)
    std_before, attempts = std, 0
    if std == 0.0 and not cfg.within(std):
      raise ValueError(_constant_output_message(l, layer, cfg.orthonormal))
    while not cfg.within(std):
      factors[k] *= float(np.float32(cfg.target_std / (std + STD_EPS)))
      flat[k] = (jnp.float32(factors[k]) * base_leaves[k]).astype(base_leaves[k].dtype)
      std, mean, out = measure(l)
      attempts += 1
      if attempts > cfg.max_iter:
        break
    converged = cfg.within(std)
    hist["layer"].append(layer.kernel)
    hist["std_before"].append(std_before)
    hist["std_after"].append(std)
    hist["mean_after"].append(mean)
    hist["iterations"].append(attempts)
    hist["converged"].append(converged)
    if not converged:
      bound = "|std² − target_std²| <" if cfg.tol_on == "variance" else "|std − target_std| ≤"
      warnings.warn(
        f"LSUV: layer {l} (kernel {layer.kernel!r}) did not converge: its output std is "
        f"{std:.8g} after {attempts} corrections (std {std_before:.6g} before, kernel "
        f"×{factors[k]:.3g}; target_std {cfg.target_std}, {bound} tol={cfg.tol}, "
        f"max_iter={cfg.max_iter}). It is marked converged=False in the history. Likely "
        "causes: the output hardly depends on the kernel's scale (e.g. a constant or zero "
        "batch with a non-zero bias: check the batch, or use orthonormal=True, which zeroes "
        "the biases first), or tol is too tight for max_iter.",
        stacklevel=errors.user_stacklevel(),
      )
  out_mean, finite = out
  if not finite:
    what = "the loss" if fn is loss_fn else "the model's outputs (loss_fn.forward)"
    raise errors.NonFiniteError(
      f"LSUV: {what} is NaN or inf (mean {out_mean}) with the rescaled params; check "
      f"loss_fn{' and the labels' if fn is loss_fn else ''}. error.last_good holds those params.",
      step=len(layers),
      last_good=result((flat, factors), hist),
    )
  return result((flat, factors), hist)
