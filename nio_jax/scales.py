"""Per-tensor scales: *where scales meet params*.

The searches (NIO, GradInit, ...) never change a parameter's direction, only its norm: each
parameter leaf `θ0_l` gets one scalar `s_l`, and the network that is evaluated is
`apply_scales(θ0, s) = {l: s_l · θ0_l}`. A leaf created by `nn.scan` over `K` identical
blocks (its path has a key ending in `_scan`, e.g. `stage2_scan`, and its leading axis is the
block index) gets a stacked scale of shape `[K]`, so every block is still addressed
separately.

Leaf selection follows the released code (ALGORITHMS.md, "NIO search loop"): weights get the
lower bound `min_scale` (0.01), biases (leaves whose own name contains "bias", NNX included:
`nio_jax.leaves.is_bias`) get 0, and a leaf (or a block of a stacked leaf) whose initial norm
is 0 is not tuned. A predicate on the leaf path overrides the selection. Which leaf is what
(bias, batch norm, stacked, ...) is decided in `nio_jax.leaves`, the one home of those rules.

Every public function here checks its input only where the values are concrete, so it can be
used inside `jax.jit`, `jax.vmap` and `jax.grad` (the checks skip themselves on tracers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, leaves
from nio_jax.leaves import LeafKinds, is_stacked, path_names

PyTree = Any


class ScaleSpec(NamedTuple):
  """What the search may do to each scale (trees with the structure of the scales).

  Attributes:
    trainable: bool arrays; False where the scale stays fixed at 1 (zero-norm leaves and
      leaves rejected by the `select` predicate).
    min_scale: float arrays; the lower bound of the projection `s ← max(s, min_scale)`.
    kinds: the `nio_jax.leaves.LeafKinds` of the params the scales belong to (what each leaf
      is: bias, batch norm, layer norm, ...), or None when unknown. A pytree without leaves.
  """

  trainable: PyTree
  min_scale: PyTree
  kinds: LeafKinds | None = None


def leaf_norms(path, leaf):
  """The norm of a leaf (`[K]` block norms for a stacked leaf): what a scale multiplies."""
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
  kinds: LeafKinds | None = None,
) -> tuple[PyTree, ScaleSpec]:
  """The scales a search tunes (all ones) and their `ScaleSpec`.

  Works on concrete params and inside `jit` / `vmap` / `grad` (the "no scalable leaf" check
  runs only when the params are concrete).

  Args:
    params: the parameter pytree `θ0`.
    select: optional predicate `(path, leaf) -> bool` on the params path; leaves it rejects
      keep scale 1. Default: every leaf.
    min_scale: lower bound for weights (every leaf that is not a bias).
    min_scale_bias: lower bound for biases (`nio_jax.leaves.is_bias`: the leaf's own name
      contains "bias"; for NNX the name before `.value`).
    kinds: the params' `LeafKinds` (the searches pass `nio_jax.leaves.leaf_kinds_for(loss_fn,
      params)`, which knows the structure the Flax adapters hand over); None classifies
      `params` alone (`nio_jax.leaves.classify`). Stored in `spec.kinds`.

  Returns:
    `(scales, spec)`: `scales` has the structure of `params`, each leaf a float32 scalar
    (or `[K]` for a stacked leaf); `spec` says which are trainable and their bounds.
  """
  checks.check_params(params)
  checks.check_positive("min_scale", min_scale, allow_zero=True)
  checks.check_positive("min_scale_bias", min_scale_bias, allow_zero=True)
  if kinds is None:
    kinds = leaves.classify(params)
  elif not isinstance(kinds, LeafKinds):
    raise TypeError(f"kinds must be a nio_jax.leaves.LeafKinds or None, got {kinds!r}.")

  def one(path, leaf):
    norms = leaf_norms(path, leaf)
    return jnp.ones_like(norms)

  def trainable(path, leaf):
    ok = leaf_norms(path, leaf) > 0
    if select is not None and not select(path, leaf):
      ok = jnp.zeros_like(ok)
    return ok

  def bound(path, leaf):
    b = min_scale_bias if kinds.is_bias(path) else min_scale
    return jnp.full(jnp.shape(leaf_norms(path, leaf)), b, jnp.float32)

  scales = jax.tree_util.tree_map_with_path(one, params)
  spec = ScaleSpec(
    trainable=jax.tree_util.tree_map_with_path(trainable, params),
    min_scale=jax.tree_util.tree_map_with_path(bound, params),
    kinds=kinds,
  )
  flags = jax.tree_util.tree_leaves(spec.trainable)
  concrete = not any(isinstance(t, jax.core.Tracer) for t in flags)
  if concrete and not any(bool(np.any(np.asarray(t))) for t in flags):
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
  checks.check_same_structure(params, scales, "params", "scales")
  checks.check_scales(scales)

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
