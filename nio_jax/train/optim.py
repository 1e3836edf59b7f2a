"""The SGD optimizer of the recipes, with path-based parameter groups.

* Weight decay (coupled, as `torch.optim.SGD(weight_decay=...)`) on every leaf except
  normalisation layers. Which leaves those are is decided by structure in
  `nio_jax.leaves` (a module holding only `scale`/`bias`, batch norm and layer norm
  alike), not by module names.
* Models without normalisation layers ("no-norm recipe"): biases and scalar leaves (Fixup
  biases / multipliers, any leaf with one element or a name containing "scale") train at
  `slow_lr_factor * lr` (lr/10), and gradients are clipped at global norm 1.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from nio_jax import leaves
from nio_jax.train.schedules import make_schedule

PyTree = Any


def has_norm_layers(params: PyTree) -> bool:
  """True if some leaf of `params` belongs to a normalisation layer (`leaves.classify`)."""
  kinds = leaves.classify(params)
  return any(kinds.is_norm(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))


def decay_mask(params: PyTree) -> PyTree:
  """True where weight decay applies (every leaf except normalisation-layer leaves)."""
  kinds = leaves.classify(params)
  return jax.tree_util.tree_map_with_path(lambda p, _: not kinds.is_norm(p), params)


def is_slow_leaf(path, leaf) -> bool:
  """Bias / scalar leaves of the no-norm recipe: a bias (`leaves.is_bias`), a leaf whose
  name contains "scale", or a leaf with a single element."""
  name = leaves.leaf_name(path).lower()
  return leaves.is_bias(path) or "scale" in name or int(np.size(leaf)) == 1


def param_labels(params: PyTree, slow_biases: bool) -> PyTree:
  """`"slow"` / `"default"` label tree for `optax.multi_transform`."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: "slow" if slow_biases and is_slow_leaf(p, x) else "default", params
  )


def resolve_no_norm(config, variables: PyTree) -> bool:
  """The `no_norm_recipe` flag: explicit, else True iff no batch_stats and no norm leaves."""
  if config.get("no_norm_recipe") is not None:
    return bool(config.no_norm_recipe)
  if "batch_stats" in variables and jax.tree_util.tree_leaves(variables["batch_stats"]):
    return False
  return not has_norm_layers(variables["params"])


def resolve_grad_clip(config, no_norm: bool) -> float | None:
  """The global-norm clipping threshold: `grad_clip_norm` when set (0: none), else
  `no_norm_grad_clip` under the no-norm recipe, else None."""
  if config.get("grad_clip_norm") is not None:
    return float(config.grad_clip_norm) or None
  return float(config.no_norm_grad_clip) if no_norm else None


def make_optimizer(
  config, params: PyTree, steps_per_epoch: int, *, no_norm: bool
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)`: clip -> coupled weight decay (masked) -> momentum -> per-group lr."""
  schedule = make_schedule(config, steps_per_epoch)
  clip = resolve_grad_clip(config, no_norm)
  slow = float(config.slow_lr_factor)

  def sgd(sched):
    return optax.chain(
      optax.trace(decay=float(config.momentum), nesterov=bool(config.nesterov)),
      optax.scale_by_learning_rate(sched),
    )

  parts = []
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  if float(config.weight_decay) > 0:
    parts.append(optax.add_decayed_weights(float(config.weight_decay), mask=decay_mask))
  parts.append(
    optax.multi_transform(
      {"default": sgd(schedule), "slow": sgd(lambda t: slow * schedule(t))},
      lambda p: param_labels(p, slow_biases=no_norm),
    )
  )
  return optax.chain(*parts), schedule
