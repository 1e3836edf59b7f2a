"""The scale optimiser shared by NIO and GradInit ("RescaleAdam"), as optax transformations.

`rescale_adam(lr, spec)` = chain of
  1. `optax.clip(grad_clip)`: each scale's gradient clipped to ±1;
  2. `scale_by_split_adam`: Adam whose *first* moment is kept separately for constraint steps
     and objective steps (each with its own bias-correction count), sharing one *second*
     moment whose bias correction counts both kinds of steps;
  3. `optax.scale_by_learning_rate(lr)`;
  4. `freeze(spec.trainable)`: no update for fixed scales, nor for a scale that reached 0
     (the released code skips a parameter whose norm is 0, for ever);
  5. `project_min_scale(spec.min_scale)`: `s ← max(s, min_scale)`.

The step kind is passed as an optax extra argument: `tx.update(g, state, scales,
is_constraint=flag)` where `flag` may be a traced bool.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class SplitAdamState(NamedTuple):
  """State of `scale_by_split_adam`: first moments and step counts kept apart for objective
  and constraint steps, one shared second moment."""

  mu_objective: PyTree
  mu_constraint: PyTree
  nu: PyTree
  count_objective: jax.Array
  count_constraint: jax.Array


def scale_by_split_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
  """Adam direction with separate first moments for constraint / objective steps.

  For a step of kind k (constraint or objective) with gradient g:
    m_k ← b1·m_k + (1−b1)·g;  v ← b2·v + (1−b2)·g²;  n_k ← n_k + 1
    update = (m_k / (1 − b1^{n_k})) / (sqrt(v / (1 − b2^{n_obj + n_cons})) + eps)
  which is the released RescaleAdam's rule (before the −lr).
  """

  def init_fn(params):
    zeros = lambda: jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return SplitAdamState(
      zeros(), zeros(), zeros(), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None, *, is_constraint=False, **extra_args):
    del params, extra_args
    c = jnp.asarray(is_constraint, bool)
    mu_o = jax.tree_util.tree_map(
      lambda m, g: jnp.where(c, m, b1 * m + (1 - b1) * g), state.mu_objective, updates
    )
    mu_c = jax.tree_util.tree_map(
      lambda m, g: jnp.where(c, b1 * m + (1 - b1) * g, m), state.mu_constraint, updates
    )
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    n_o = state.count_objective + jnp.where(c, 0, 1).astype(jnp.int32)
    n_c = state.count_constraint + jnp.where(c, 1, 0).astype(jnp.int32)
    steps = jnp.where(c, n_c, n_o).astype(jnp.float32)
    bc1 = 1 - b1**steps
    bc2 = 1 - b2 ** (n_o + n_c).astype(jnp.float32)
    mu = jax.tree_util.tree_map(lambda a, b: jnp.where(c, b, a), mu_o, mu_c)
    new = jax.tree_util.tree_map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu)
    return new, SplitAdamState(mu_o, mu_c, nu, n_o, n_c)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def freeze(trainable: PyTree) -> optax.GradientTransformation:
  """Zeroes the update of every scale that is not trainable or is exactly 0."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("freeze needs the current scales (pass params to update).")
    out = jax.tree_util.tree_map(
      lambda u, t, s: jnp.where(jnp.logical_and(t, s != 0), u, jnp.zeros_like(u)),
      updates,
      trainable,
      params,
    )
    return out, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def project_min_scale(min_scale: PyTree) -> optax.GradientTransformation:
  """Turns the update `u` into `max(s + u, min_scale) − s` (projection onto the bound)."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("project_min_scale needs the current scales (pass params to update).")
    out = jax.tree_util.tree_map(
      lambda u, s, lo: jnp.maximum(s + u, lo) - s, updates, params, min_scale
    )
    return out, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def rescale_adam(
  learning_rate,
  spec,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  grad_clip: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """The full scale optimiser (see the module docstring). `spec` is a `ScaleSpec`."""
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip(grad_clip))
  parts += [
    scale_by_split_adam(b1, b2, eps),
    optax.scale_by_learning_rate(learning_rate),
    freeze(spec.trainable),
    project_min_scale(spec.min_scale),
  ]
  return optax.chain(*parts)
