"""Fixup initialisation rules (Zhang, Dauphin & Ma, ICLR 2019) applied to a parameter tree.

Rules (L residual branches, m layers per branch):
  * the last layer of every branch (``conv{m}``) -> 0;
  * the other branch layers (``conv1 .. conv{m-1}``), assumed He-initialised, are multiplied by
    ``L^(-1/(2m-2))`` (L^-1/2 for basic blocks, L^-1/4 for bottlenecks);
  * the classifier (``fc`` / ``head`` / ``classifier`` / ``linear``) weight and bias -> 0;
  * scalar biases (Fixup scalars that are biases, directly in a branch or at the top level)
    -> 0, scalar multipliers (the other Fixup scalars directly in a branch) -> 1.

Which leaves are Fixup scalars is decided in :mod:`nio_jax.leaves` (kind ``SCALAR``: a
one-element parameter held directly by a module without a kernel; a bias when its name
contains "bias"). A *branch* is any sub-tree whose key matches ``_block<i>`` or is stacked
(``leaves.is_stacked``: an ``nn.scan`` stack whose leading axis counts the blocks), i.e. the
layout of ``nio_jax.models``. Shortcut convs (e.g. ``downsample_conv``) and BN sub-dicts are
left alone.

The natural use is ``nio_jax.models.get("resnet110", variant="fixup")``, whose own init already
is the Fixup init (``fixup_rescale=True``).  :func:`fixup_rules` turns the He-initialised params of
``variant="fixup", fixup_rescale=False`` (the GradInit release's ``fixup_resnet_cifar.py`` init)
into exactly those.  Params whose branch-final layers are all zero already are treated as
Fixup-initialised and returned unchanged (``force=True`` overrides), so the rules are never
applied twice.

Two call forms of :func:`fixup_init`:
  * ``fixup_init(params, *, num_branches=None, layers_per_branch=None)`` -> params;
  * ``fixup_init(loss_fn, params, data, config, *, progress=False)`` -> ``InitResult``
    (the ``nio_jax.methods`` registry interface; ``loss_fn``/``data`` are ignored, ``config`` may
    give ``num_branches`` / ``layers_per_branch``).
Both infer L and m from the tree when not given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nio_jax import leaves

PyTree = Any

BRANCH_RE = re.compile(r"_block\d+$")
_CONV_RE = re.compile(r"^conv(\d+)$")
CLASSIFIER_NAMES = ("fc", "head", "classifier", "linear")


def fixup_multiplier(num_branches: int, layers_per_branch: int) -> float:
  """``L^(-1/(2m-2))``."""
  if layers_per_branch < 2:
    raise ValueError(f"Fixup needs >= 2 layers per branch, got {layers_per_branch}")
  if num_branches < 1:
    raise ValueError(f"num_branches must be >= 1, got {num_branches}")
  return float(num_branches) ** (-1.0 / (2 * layers_per_branch - 2))


def _first_leaf(tree):
  return jax.tree_util.tree_leaves(tree)[0]


def _is_stack(key) -> bool:
  return leaves.is_stacked((str(key),))


def _is_branch(key) -> bool:
  return bool(BRANCH_RE.search(str(key))) or _is_stack(key)


def _branches(tree: Mapping, out: list):
  """Collect (branch_subtree, num_blocks) pairs."""
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
  """``(num_branches, layers_per_branch)`` of a ``nio_jax.models``-style tree."""
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
  """Apply the Fixup rules (module docstring) to ``params``; returns a new tree."""
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


def fixup_init(*args, **kwargs):
  """See the module docstring for the two call forms."""
  if len(args) <= 1 and "loss_fn" not in kwargs:
    (params,) = args if args else (kwargs.pop("params"),)
    return fixup_rules(params, **kwargs)
  return _fixup_method(*args, **kwargs)


def _fixup_method(loss_fn, params, data=None, config=None, *, progress: bool = False):
  from nio_jax.results import InitResult

  del loss_fn, data, progress
  from nio_jax import errors

  errors.check_params(params)
  if config is not None and not isinstance(config, Mapping) and not hasattr(config, "to_dict"):
    raise TypeError(
      f"Fixup config must be None, a dict or a ConfigDict with keys "
      f"num_branches, layers_per_branch, force; got {type(config).__name__}."
    )
  cfg = dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config or {})
  allowed = {"num_branches", "layers_per_branch", "force"}
  unknown = set(cfg) - allowed
  if unknown:
    raise ValueError(f"unknown Fixup config keys {sorted(unknown)}; known: {sorted(allowed)}")
  L, m = infer_structure(params)
  cfg.setdefault("num_branches", L)
  cfg.setdefault("layers_per_branch", m)
  new = fixup_rules(params, **cfg)
  return InitResult(params=new, scales=None, history={}, method="fixup", config=cfg)


__all__ = ["fixup_init", "fixup_rules", "fixup_multiplier", "infer_structure"]
