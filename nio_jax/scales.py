"""Per-tensor scales: *where scales meet params*.

The searches (NIO, GradInit, ...) never change a parameter's direction, only its norm: each
parameter leaf `θ0_l` gets one scalar `s_l`, and the network that is evaluated is
`apply_scales(θ0, s) = {l: s_l · θ0_l}`. A leaf created by `nn.scan` over `K` identical
blocks (its path has a key ending in `_scan`, e.g. `stage2_scan`, and its leading axis is the
block index) gets a stacked scale of shape `[K]`, so every block is still addressed
separately.

Leaf selection follows the released code (ALGORITHMS.md, "NIO search loop"): weights get the
lower bound `min_scale` (0.01), biases (leaves named `bias`) get 0, and a leaf (or a block of
a stacked leaf) whose initial norm is 0 is not tuned. A predicate on the leaf path overrides
the selection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import errors

PyTree = Any
_STACKED = re.compile(r"(^|_)scan$")
_BATCHNORM = re.compile(r"(?i)^(batchnorm(_\d+)?|bn\d*(_\d+)?|.*_bn\d*)$")


def key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path) -> tuple[str, ...]:
  return tuple(key_name(k) for k in path)


def is_stacked(path) -> bool:
  """True for a leaf of an `nn.scan` stack: some key of its path ends in `_scan`."""
  return any(_STACKED.search(n) for n in path_names(path))


def is_bias(path) -> bool:
  names = path_names(path)
  return bool(names) and "bias" in names[-1].lower()


def is_batchnorm(path) -> bool:
  """True for leaves of a batch-norm layer (module named `BatchNorm_*`, `bn*` or `*_bn*`)."""
  return any(_BATCHNORM.match(n) for n in path_names(path)[:-1])


def default_grad_filter(path, leaf=None) -> bool:
  """Leaves whose gradients enter GradCosine: every leaf except batch-norm ones.

  The released NIO code takes gradients w.r.t. the weight and bias of every conv, dense and
  layer-norm layer, i.e. everything except batch-norm affine parameters (which are still
  *rescaled*, see `init_scales`).
  """
  return not is_batchnorm(path)


class ScaleSpec(NamedTuple):
  """What the search may do to each scale (trees with the structure of the scales).

  Attributes:
    trainable: bool arrays; False where the scale stays fixed at 1 (zero-norm leaves and
      leaves rejected by the `select` predicate).
    min_scale: float arrays; the lower bound of the projection `s ← max(s, min_scale)`.
  """

  trainable: PyTree
  min_scale: PyTree


def leaf_norms(path, leaf):
  """L2 norm of a leaf; one per block for a scanned (stacked) leaf."""
  x = jnp.asarray(leaf, jnp.float32)
  if is_stacked(path) and x.ndim >= 1:
    return jnp.sqrt(jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=1))
  return jnp.sqrt(jnp.sum(x**2))


def init_scales(
  params: PyTree,
  *,
  select: Callable[[tuple, Any], bool] | None = None,
  min_scale: float = 0.01,
  min_scale_bias: float = 0.0,
) -> tuple[PyTree, ScaleSpec]:
  """The scales a search tunes (all ones) and their `ScaleSpec`.

  Args:
    params: the parameter pytree `θ0`.
    select: optional predicate `(path, leaf) -> bool` on the params path; leaves it rejects
      keep scale 1. Default: every leaf.
    min_scale: lower bound for weights (every leaf not named `bias`).
    min_scale_bias: lower bound for biases.

  Returns:
    `(scales, spec)`: `scales` has the structure of `params`, each leaf a float32 scalar
    (or `[K]` for a stacked leaf); `spec` says which are trainable and their bounds.
  """
  errors.check_params(params)
  errors.check_positive("min_scale", min_scale, allow_zero=True)
  errors.check_positive("min_scale_bias", min_scale_bias, allow_zero=True)

  def one(path, leaf):
    norms = leaf_norms(path, leaf)
    return jnp.ones_like(norms)

  def trainable(path, leaf):
    ok = leaf_norms(path, leaf) > 0
    if select is not None and not select(path, leaf):
      ok = jnp.zeros_like(ok)
    return ok

  def bound(path, leaf):
    b = min_scale_bias if is_bias(path) else min_scale
    return jnp.full(jnp.shape(leaf_norms(path, leaf)), b, jnp.float32)

  scales = jax.tree_util.tree_map_with_path(one, params)
  spec = ScaleSpec(
    trainable=jax.tree_util.tree_map_with_path(trainable, params),
    min_scale=jax.tree_util.tree_map_with_path(bound, params),
  )
  if not any(bool(jnp.any(t)) for t in jax.tree_util.tree_leaves(spec.trainable)):
    raise ValueError(
      "params have no scalable leaf: every leaf has zero norm or was rejected "
      "by `select`. Initialise the model (e.g. model.init) before the search."
    )
  return scales, spec


def _broadcast(scale, leaf):
  scale = jnp.asarray(scale)
  if scale.ndim == 0:
    return scale
  return jnp.reshape(scale, scale.shape + (1,) * (jnp.ndim(leaf) - scale.ndim))


def apply_scales(params: PyTree, scales: PyTree) -> PyTree:
  """The leafwise product `s_l · θ0_l` (stacked scales broadcast over the block axis).

  Raises `ValueError` if `scales` does not have the tree structure of `params`, or a stacked
  scale's length differs from its leaf's leading axis. The result keeps each leaf's dtype.
  """
  errors.check_same_structure(params, scales, "params", "scales")
  errors.check_scales(scales)

  def mul(path, leaf, s):
    s = jnp.asarray(s)
    if s.ndim > 1 or (s.ndim == 1 and (jnp.ndim(leaf) == 0 or s.shape[0] != jnp.shape(leaf)[0])):
      raise ValueError(
        f"scale for {jax.tree_util.keystr(path)} has shape {s.shape}, which does "
        f"not match the leading axis of its leaf {jnp.shape(leaf)}."
      )
    return (_broadcast(s, leaf) * leaf).astype(jnp.result_type(leaf))

  return jax.tree_util.tree_map_with_path(mul, params, scales)


def scales_to_dict(scales: PyTree) -> dict[str, list[float] | float]:
  """`{'/path/to/leaf': value}` for reports and JSON."""
  out = {}
  for path, s in jax.tree_util.tree_leaves_with_path(scales):
    v = np.asarray(s)
    out["/".join(path_names(path))] = v.tolist()
  return out
