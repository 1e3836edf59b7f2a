"""Fixup (Zhang, Dauphin & Ma, ICLR 2019): the residual-branch rules applied to a parameter tree.

Rules (L residual branches, m layers per branch):

* the last layer of every branch (`conv{m}`) -> 0;
* the other branch layers (`conv1 .. conv{m-1}`), assumed He-initialised, are multiplied by
  `L^(-1/(2m-2))` (L^-1/2 for basic blocks, L^-1/4 for bottlenecks);
* the classifier (`fc` / `head` / `classifier` / `linear`) weight and bias -> 0;
* scalar biases (Fixup scalars that are biases, directly in a branch or at the top level)
  -> 0, scalar multipliers (the other Fixup scalars directly in a branch) -> 1.

Which leaves are Fixup scalars is decided in `nio_jax.leaves` (kind `SCALAR`: a one-element
parameter held directly by a module without a kernel; a bias when its name contains "bias").
A *branch* is any sub-tree whose key matches `_block<i>` or is stacked (`leaves.is_stacked`:
an `nn.scan` stack whose leading axis counts the blocks), i.e. the layout of
`nio_jax.models`. Shortcut convs (e.g. `downsample_conv`) and BN sub-dicts are left alone.

Fixup is an architecture plus its initialisation rule: the natural use is
`nio_jax.models.get("resnet110", variant="fixup")`, whose own init already is the Fixup init
(`fixup_rescale=True`); this method cannot turn a standard model into a Fixup one.
`fixup_rules` turns the He-initialised params of `variant="fixup", fixup_rescale=False` (the
GradInit release's `fixup_resnet_cifar.py` init) into exactly those. Params whose
branch-final layers are all zero already are treated as Fixup-initialised and returned
unchanged (`force=True` overrides), so the rules are never applied twice.

Two entry points:

* `fixup_rules(params, *, num_branches=None, layers_per_branch=None, force=False)` -> params;
* `fixup(loss_fn, params, data, config, *, progress=False, mesh=None)` -> `InitResult`, the
  method registered as "fixup" (`loss_fn`, `data` and `mesh` are ignored; `config` is a
  `FixupConfig`, a dict or a ConfigDict).

Both infer L and m from the tree when not given.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nio_jax import checks, leaves, method_config
from nio_jax.methods.registry import register
from nio_jax.models.cifar_resnet import fixup_multiplier
from nio_jax.results import InitResult

PyTree = Any

BRANCH_RE = re.compile(r"_block\d+$")
_CONV_RE = re.compile(r"^conv(\d+)$")
CLASSIFIER_NAMES = ("fc", "head", "classifier", "linear")


@dataclasses.dataclass(frozen=True)
class FixupConfig:
  """Fixup's structure; inferred from the parameter tree when left at None.

  Attributes:
    num_branches: L, the number of residual branches (None = counted in the tree).
    layers_per_branch: m, the layers of each branch (None = read from the tree).
    force: apply the rules even to params that already look Fixup-initialised (every
      branch-final layer zero).
  """

  num_branches: int | None = None
  layers_per_branch: int | None = None
  force: bool = False

  @classmethod
  def create(cls, config=None, **overrides) -> FixupConfig:
    """From None (infer everything), a FixupConfig, a dict or an ml_collections ConfigDict."""
    cfg = cls(**method_config.config_values(cls, config, overrides, "Fixup"))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises `TypeError` / `ValueError` naming a bad field."""
    if self.num_branches is not None:
      method_config.check_int("num_branches", self.num_branches, 1)
    if self.layers_per_branch is not None:
      method_config.check_int(
        "layers_per_branch", self.layers_per_branch, 2, " (Fixup layers per branch)"
      )
    if not isinstance(self.force, bool):
      raise TypeError(f"force must be a bool, got {self.force!r}.")

  def to_dict(self) -> dict:
    """The fields as a plain dict."""
    return method_config.to_plain_dict(self)


def _first_leaf(tree):
  return jax.tree_util.tree_leaves(tree)[0]


def _is_stack(key) -> bool:
  return leaves.is_stacked((str(key),))


def _is_branch(key) -> bool:
  return bool(BRANCH_RE.search(str(key))) or _is_stack(key)


def _branches(tree: Mapping, out: list):
  """Appends the `(branch_subtree, num_blocks)` pairs of `tree` to `out`; returns `out`."""
  for k, v in tree.items():
    if not isinstance(v, Mapping):
      continue
    if _is_branch(k):
      n = _first_leaf(v).shape[0] if _is_stack(k) else 1
      out.append((v, n))
    else:
      _branches(v, out)
  return out


def infer_structure(params: Mapping) -> tuple[int, int]:
  """`(num_branches, layers_per_branch)` of a `nio_jax.models`-style tree.

  Raises:
    ValueError: the tree has no residual branches, a branch has no `conv<i>` layers, or the
      branches disagree on their number of layers.
  """
  branches = _branches(params, [])
  if not branches:
    raise ValueError("no residual branches (keys '*_block<i>' or '*_scan') in params")
  num = sum(n for _, n in branches)
  ms = set()
  for sub, _ in branches:
    idx = [int(m.group(1)) for k in sub if (m := _CONV_RE.match(str(k)))]
    if not idx:
      raise ValueError("a residual branch has no 'conv<i>' layers")
    ms.add(max(idx))
  if len(ms) != 1:
    raise ValueError(f"branches have different numbers of layers: {sorted(ms)}")
  return num, ms.pop()


def _is_fixup_already(params: Mapping, m: int) -> bool:
  last = [sub[f"conv{m}"] for sub, _ in _branches(params, []) if f"conv{m}" in sub]
  return bool(last) and all(
    not bool(jnp.any(leaf != 0)) for t in last for leaf in jax.tree_util.tree_leaves(t)
  )


def fixup_rules(
  params: Mapping,
  *,
  num_branches: int | None = None,
  layers_per_branch: int | None = None,
  classifier_names: tuple[str, ...] = CLASSIFIER_NAMES,
  force: bool = False,
) -> dict:
  """Applies the Fixup rules (module docstring) to `params`.

  Args:
    params: a `nio_jax.models`-style parameter tree with residual branches.
    num_branches: L (None = inferred from the tree).
    layers_per_branch: m (None = inferred from the tree).
    classifier_names: top-level keys of the classifier, zeroed.
    force: apply the rules even when every branch-final layer is zero already.

  Returns:
    A new tree; `params` itself is not modified.
  """
  inf_l, inf_m = infer_structure(params)
  L = inf_l if num_branches is None else num_branches
  m = inf_m if layers_per_branch is None else layers_per_branch
  if not force and _is_fixup_already(params, m):
    return jax.tree_util.tree_map(lambda a: a, dict(params))
  mult = fixup_multiplier(L, m)
  kinds = leaves.classify(params)

  def scalar(path: tuple[str, ...]) -> str | None:
    """ "bias" / "scale" for a Fixup scalar at `path`, else None."""
    if kinds.kind(path) != leaves.SCALAR:
      return None
    return "bias" if leaves.is_bias(path) else "scale"

  def branch(sub: Mapping, where: tuple[str, ...]) -> dict:
    out = {}
    for k, v in sub.items():
      cm = _CONV_RE.match(str(k))
      if cm and isinstance(v, Mapping):
        i = int(cm.group(1))
        if i == m:
          out[k] = jax.tree_util.tree_map(jnp.zeros_like, v)
        elif i < m:
          out[k] = {kk: (vv * mult if kk == "kernel" else vv) for kk, vv in v.items()}
        else:
          raise ValueError(f"conv{i} in a branch of {m} layers")
      elif not isinstance(v, Mapping) and scalar((*where, str(k))) == "bias":
        out[k] = jnp.zeros_like(v)
      elif not isinstance(v, Mapping) and scalar((*where, str(k))) == "scale":
        out[k] = jnp.ones_like(v)
      else:
        out[k] = v
    return out

  def walk(tree: Mapping, where: tuple[str, ...]) -> dict:
    top = not where
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        if _is_branch(k):
          out[k] = branch(v, (*where, str(k)))
        elif top and str(k) in classifier_names:
          out[k] = jax.tree_util.tree_map(jnp.zeros_like, v)
        else:
          out[k] = walk(v, (*where, str(k)))
      elif top and scalar((str(k),)) == "bias":
        out[k] = jnp.zeros_like(v)
      else:
        out[k] = v
    return out

  return walk(params, ())


@register("fixup", config_cls=FixupConfig, label="Fixup")
def fixup(
  loss_fn: Callable | None,
  params: PyTree,
  data: Any = None,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """Fixup (Zhang et al., 2019): the Fixup rules applied to a Fixup model's params.

  Args:
    loss_fn: ignored (the common interface of `nio_jax.methods`).
    params: the He-initialised params of a `variant="fixup"` model (or already Fixup ones,
      returned unchanged unless `force`).
    data: ignored.
    config: None (infer L and m), `FixupConfig`, dict or ConfigDict.
    progress: ignored (nothing to show).
    mesh: ignored (no data-dependent work).

  Returns:
    `InitResult` with the new params, no scales, an empty history and the config that ran
    (L and m filled in).

  Raises:
    ValueError / TypeError: bad config, non-floating params, or a tree without residual
      branches.
  """
  del loss_fn, data, progress, mesh
  cfg = FixupConfig.create(config)
  checks.check_params(params)
  num, m = infer_structure(params)
  cfg = dataclasses.replace(
    cfg,
    num_branches=num if cfg.num_branches is None else cfg.num_branches,
    layers_per_branch=m if cfg.layers_per_branch is None else cfg.layers_per_branch,
  )
  new = fixup_rules(
    params,
    num_branches=cfg.num_branches,
    layers_per_branch=cfg.layers_per_branch,
    force=cfg.force,
  )
  return InitResult(params=new, scales=None, history={}, method="fixup", config=cfg.to_dict())


__all__ = ["FixupConfig", "fixup", "fixup_multiplier", "fixup_rules", "infer_structure"]
