"""Leaf classification: what each parameter leaf is, decided by the model's structure.

This module is the one home of the rules that say which leaf is a conv/dense kernel, a bias, a
batch-norm or layer-norm parameter, a Fixup scalar or a stacked (`nn.scan`) leaf. Every user
of such a rule (the scales' lower bounds, the leaves that enter GradCosine, GradInit's
layer-norm cap, MetaInit's ≥2-dim rule, the Fixup rules, weight decay) asks this module.

Leaf kinds (`LeafKinds.kind`):

* `KERNEL` / `BIAS`: the weight / bias of a conv or dense layer (a module holding `kernel`);
* `BATCH_NORM_SCALE` / `BATCH_NORM_BIAS`: the affine parameters of a module that keeps batch
  statistics;
* `LAYER_NORM_SCALE` / `LAYER_NORM_BIAS`: the affine parameters of a normalisation module
  without batch statistics (LayerNorm; also RMSNorm and GroupNorm, which look the same);
* `SCALAR`: a one-element parameter (per block, for a stacked leaf) held directly by a module
  that is none of the above, e.g. Fixup's scalar biases and multipliers;
* `OTHER`: everything else (position embeddings, class tokens, embedding tables,
  relative-position tables).

How the kind of a module is decided (`classify`):

1. by the module kinds handed over with the loss function (`module_kinds`, a mapping from
   module path to "batch_norm" / "layer_norm" / "linear" / "other"). The Flax adapters build
   it (`nio_jax.flax_utils`): for linen, a module that owns `batch_stats` is batch norm; for
   NNX, the module's type decides (`nnx.BatchNorm`, `nnx.LayerNorm`, `nnx.Linear`, ...).
   The core never sees `batch_stats` or NNX types: only this mapping, attached to the loss
   function as its `module_kinds` attribute;
2. otherwise by the params' own structure: a module holding `kernel` (or, for hand-written
   layers, `w` / `weight` / `weights`, with `b` as its bias) is a linear layer; a
   module whose parameters are only `scale` / `bias` (more than one element) is a
   normalisation layer, batch norm if it is in `module_kinds`, layer norm if not. **Without
   `module_kinds`** (a hand-written loss function) batch norm and layer norm hold the same
   leaves, so batch norm is then recognised by the module's name only (`BatchNorm_*`, `bn*`,
   `*_bn*`), the one place a name decides a module's kind. DenseNet's batch norms are named
   `norm1`/`norm2` like ViT's layer norms: use the adapters (or pass `module_kinds`).

Within a module, a leaf's role is its Flax name: `kernel`, or a bias when its name contains
"bias" (as the released code's `'bias' in name`). For NNX, whose state paths end in the
`value` attribute of the `nnx.Param`, the name is the key before it.

The leaves that enter GradCosine are those of conv, dense and layer-norm layers (the released
NIO code's `get_ordered_params`: `nn.Conv2d`, `nn.Linear`, `nn.LayerNorm` weights and
biases): `GRAD_KINDS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any

KERNEL = "kernel"
BIAS = "bias"
BATCH_NORM_SCALE = "batch_norm_scale"
BATCH_NORM_BIAS = "batch_norm_bias"
LAYER_NORM_SCALE = "layer_norm_scale"
LAYER_NORM_BIAS = "layer_norm_bias"
SCALAR = "scalar"
OTHER = "other"
KINDS = (
  KERNEL,
  BIAS,
  BATCH_NORM_SCALE,
  BATCH_NORM_BIAS,
  LAYER_NORM_SCALE,
  LAYER_NORM_BIAS,
  SCALAR,
  OTHER,
)
#: The leaves whose gradients enter GradCosine (conv/dense/layer-norm weights and biases).
GRAD_KINDS = frozenset({KERNEL, BIAS, LAYER_NORM_SCALE, LAYER_NORM_BIAS})
NORM_KINDS = frozenset({BATCH_NORM_SCALE, BATCH_NORM_BIAS, LAYER_NORM_SCALE, LAYER_NORM_BIAS})

#: Module kinds of `module_kinds` (what the adapters hand over).
MODULE_KINDS = ("batch_norm", "layer_norm", "linear", "other")

_STACKED = re.compile(r"(^|_)scan$")
_BATCHNORM_NAME = re.compile(r"(?i)^(batchnorm(_\d+)?|bn\d*(_\d+)?|.*_bn\d*)$")
_NORM_LEAVES = frozenset({"scale", "bias"})


# ----------------------------------------------------------------------------------------
# Paths


def key_name(key) -> str:
  """The name of one key of a pytree path (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_value_box(key) -> bool:
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def path_names(path) -> tuple[str, ...]:
  """The names along a leaf's path, without the trailing `value` attribute of an NNX
  variable (`('conv1', 'bias', .value)` -> `('conv1', 'bias')`)."""
  keys = list(path)
  if keys and _is_value_box(keys[-1]):
    keys = keys[:-1]
  return tuple(key_name(k) for k in keys)


def leaf_name(path) -> str:
  """The leaf's own name (`kernel`, `bias`, ...; NNX-aware, see `path_names`)."""
  names = path_names(path)
  return names[-1] if names else ""


def is_stacked(path) -> bool:
  """True for a leaf of an `nn.scan` stack: some key of its path ends in `_scan` (its leading
  axis is the block index)."""
  return any(_STACKED.search(n) for n in path_names(path))


def is_bias(path, leaf=None) -> bool:
  """The leaf's role is a bias: its own name contains "bias" (as in the released code)."""
  return "bias" in leaf_name(path).lower()


def is_batchnorm_name(path) -> bool:
  """Name-only guess (the fallback without structure): a module on the path is named
  `BatchNorm_*`, `bn*` or `*_bn*`."""
  return any(_BATCHNORM_NAME.match(n) for n in path_names(path)[:-1])


def default_grad_filter(path, leaf=None) -> bool:
  """The default choice of the leaves that enter GradCosine, in predicate form.

  The searches (`nio`, `measure`, `make_nio_step`) replace this function, like the string
  "default", with the structural filter of the params and the loss function
  (`LeafKinds.grad_filter`: conv, dense and layer-norm leaves; batch-norm leaves excluded by
  structure). Called by itself it sees one path only, so it can only guess by name: every
  leaf except those of modules named like batch norm (`is_batchnorm_name`).
  """
  return not is_batchnorm_name(path)


# ----------------------------------------------------------------------------------------
# Classification


class LeafKinds:
  """The kind of every leaf of one params tree (see the module docstring).

  Built by `classify`. Hashable (usable as a static `jit` argument) and a pytree without
  leaves (it can travel inside a `ScaleSpec`). Its predicates take the `(path, leaf)` form of
  `grad_filter` / `wrt` / `select`.
  """

  def __init__(self, kinds: Mapping[tuple[str, ...], str]):
    bad = sorted({k for k in kinds.values() if k not in KINDS})
    if bad:
      raise ValueError(f"unknown leaf kind(s) {bad}; known: {', '.join(KINDS)}.")
    self._kinds = dict(kinds)
    self._key = tuple(sorted(self._kinds.items()))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, LeafKinds) and self._key == other._key

  def __repr__(self):
    counts = {k: sum(1 for v in self._kinds.values() if v == k) for k in KINDS}
    return f"LeafKinds({ {k: n for k, n in counts.items() if n} })"

  def items(self):
    """`('a/b/kernel', kind)` pairs, in path order."""
    return [("/".join(p), k) for p, k in self._key]

  def kind(self, path) -> str:
    """The kind of the leaf at `path` (a pytree key path or a tuple of names)."""
    names = tuple(path) if all(isinstance(k, str) for k in path) else path_names(path)
    try:
      return self._kinds[names]
    except KeyError:
      raise ValueError(
        f"leaf {'/'.join(names)!r} is not in the classified params tree; build the "
        "LeafKinds from the same params (nio_jax.leaves.classify(params))."
      ) from None

  @property
  def grad_filter(self) -> KindFilter:
    """Predicate `(path, leaf) -> bool`, True for the leaves that enter GradCosine
    (`GRAD_KINDS`). Equal filters compare and hash equal (one compilation per structure)."""
    return KindFilter(self, GRAD_KINDS)

  def is_norm(self, path, leaf=None) -> bool:
    """True for batch-norm and layer-norm affine parameters."""
    return self.kind(path) in NORM_KINDS

  def is_batch_norm(self, path, leaf=None) -> bool:
    return self.kind(path) in (BATCH_NORM_SCALE, BATCH_NORM_BIAS)

  def is_layer_norm_scale(self, path, leaf=None) -> bool:
    return self.kind(path) == LAYER_NORM_SCALE

  def is_bias(self, path, leaf=None) -> bool:
    """The leaf's role is a bias (its name, see `is_bias`); the bound `min_scale_bias`."""
    return is_bias(path)

  def tree(self, params: PyTree) -> PyTree:
    """A tree like `params` holding each leaf's kind."""
    return jax.tree_util.tree_map_with_path(lambda p, _: self.kind(p), params)


class KindFilter:
  """The predicate `(path, leaf) -> bool`: the leaf's kind is one of `kinds`."""

  def __init__(self, leaf_kinds: LeafKinds, kinds):
    self.leaf_kinds, self.kinds = leaf_kinds, frozenset(kinds)

  def __call__(self, path, leaf=None) -> bool:
    return self.leaf_kinds.kind(path) in self.kinds

  def __hash__(self):
    return hash((self.leaf_kinds, self.kinds))

  def __eq__(self, other):
    return (
      isinstance(other, KindFilter)
      and self.kinds == other.kinds
      and self.leaf_kinds == other.leaf_kinds
    )

  def __repr__(self):
    return f"KindFilter({sorted(self.kinds)})"

  @property
  def __name__(self) -> str:  # for InitResult.config / reports
    return "grad_filter" if self.kinds == GRAD_KINDS else "kind_filter"


jax.tree_util.register_pytree_node(
  LeafKinds, lambda k: ((), k._key), lambda aux, _: LeafKinds(dict(aux))
)


# Hand-written layers (Flax's own toy examples hold `w` / `b`): the weight of a linear layer
# by its conventional names, and its bias.
_WEIGHT_NAMES = ("w", "weight", "weights")
_BIAS_NAMES = ("b",)


def _block_size(names: tuple[str, ...], leaf) -> int:
  shape = tuple(np.shape(leaf))
  if any(_STACKED.search(n) for n in names) and shape:
    shape = shape[1:]
  return int(np.prod(shape, dtype=np.int64))


def _module_kind(module: tuple[str, ...], own: dict, module_kinds) -> str:
  """'batch_norm' / 'layer_norm' / 'linear' / 'other' for a module with direct leaves `own`
  (name -> per-block size)."""
  if module_kinds is not None and module in module_kinds:
    return module_kinds[module]
  if "kernel" in own or any(n in _WEIGHT_NAMES for n in own):
    return "linear"
  if own and set(own) <= _NORM_LEAVES and any(n > 1 for n in own.values()):
    if module_kinds is None and module and _BATCHNORM_NAME.match(module[-1]):
      return "batch_norm"  # no structure handed over: the name fallback
    return "layer_norm"
  return "other"


def classify(params: PyTree, module_kinds: Mapping | None = None) -> LeafKinds:
  """The `LeafKinds` of `params`.

  Args:
    params: the parameter pytree (linen dicts, an NNX `State`, ...). Only paths and shapes
      are read, so tracers and `ShapeDtypeStruct`s work.
    module_kinds: optional mapping from a module path (tuple of names) to one of
      `MODULE_KINDS`; the Flax adapters build it (`linen_module_kinds`, `nnx_module_kinds` in
      `nio_jax.flax_utils`). None: decide from the params alone (batch norm by name).

  Returns:
    A `LeafKinds` covering every leaf of `params`.
  """
  if module_kinds is not None:
    module_kinds = {tuple(str(n) for n in k): v for k, v in module_kinds.items()}
    bad = sorted({v for v in module_kinds.values() if v not in MODULE_KINDS})
    if bad:
      raise ValueError(f"unknown module kind(s) {bad}; known: {', '.join(MODULE_KINDS)}.")
  leaves = [(path_names(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
  own: dict[tuple[str, ...], dict[str, int]] = {}
  for names, x in leaves:
    own.setdefault(names[:-1], {})[names[-1] if names else ""] = _block_size(names, x)
  out = {}
  for names, _ in leaves:
    module, name = names[:-1], (names[-1] if names else "")
    mk = _module_kind(module, own[module], module_kinds)
    bias = "bias" in name.lower()
    if mk == "batch_norm":
      kind = BATCH_NORM_BIAS if bias else BATCH_NORM_SCALE
    elif mk == "layer_norm":
      kind = LAYER_NORM_BIAS if bias else LAYER_NORM_SCALE
    elif mk == "linear":
      bias = bias or name in _BIAS_NAMES
      kind = KERNEL if name in ("kernel", *_WEIGHT_NAMES) else (BIAS if bias else OTHER)
    else:
      kind = SCALAR if own[module][name] == 1 else OTHER
    out[names] = kind
  return LeafKinds(out)


def batch_stats_modules(batch_stats: PyTree) -> dict[tuple[str, ...], str]:
  """`{module path: "batch_norm"}` for every module holding leaves of a `batch_stats`
  collection (linen: the module that owns batch statistics is a batch norm)."""
  if batch_stats is None:
    return {}
  return {
    path_names(p)[:-1]: "batch_norm" for p, _ in jax.tree_util.tree_leaves_with_path(batch_stats)
  }


def module_kinds_of(loss_fn) -> Mapping | None:
  """The `module_kinds` the Flax adapters attached to `loss_fn`, or None."""
  return getattr(loss_fn, "module_kinds", None)


def leaf_kinds_for(loss_fn, params: PyTree) -> LeafKinds:
  """`classify(params, module_kinds_of(loss_fn))`: what the searches use by default."""
  return classify(params, module_kinds_of(loss_fn))


def resolve_grad_filter(
  grad_filter, loss_fn, params: PyTree, kinds: LeafKinds | None = None
) -> Callable | None:
  """The predicate a search uses for `grad_filter`/`wrt`: None stays None (every leaf);
  "default" or `default_grad_filter` becomes the structural `LeafKinds.grad_filter` (from
  `kinds`, else from `loss_fn` and `params`); any other predicate is the user's own."""
  if grad_filter is None:
    return None
  if grad_filter is default_grad_filter or (
    isinstance(grad_filter, str) and grad_filter == "default"
  ):
    return (kinds if kinds is not None else leaf_kinds_for(loss_fn, params)).grad_filter
  return grad_filter
