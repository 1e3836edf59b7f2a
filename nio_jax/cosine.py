"""GradCosine: the mean off-diagonal cosine similarity of per-example (or sub-batch) gradients.

This module is *where GradCosine is computed*. Given `D` gradients `g_1..g_D` (flattened over
all selected parameter leaves) with norms `n_i = ‖g_i‖` and unit vectors `u_i = g_i / n_i`:

    GC = 1/(D(D−1)) Σ_{i≠j} cos(g_i, g_j) = (‖Σ_i u_i‖² − D) / (D(D−1)),

so neither the D×D cosine matrix nor a flattened copy of the gradients is ever built.
`D = B` in the sample-wise setting; `D = num_chunks` in the batch setting.

Everything here is differentiable with respect to `params` (the NIO search differentiates
through it: second-order autodiff through the per-example gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nio_jax import errors, per_example

PyTree = Any


class GCStats(NamedTuple):
  """GradCosine and the gradient norms it was computed from.

  Attributes:
    gc: scalar, mean off-diagonal cosine of the D gradients.
    grad_norms: `[D]`, the norm of each per-example / sub-batch gradient.
    loss: scalar, mean per-example loss of the batch (for monitoring).
  """

  gc: jax.Array
  grad_norms: jax.Array
  loss: jax.Array

  @property
  def grad_norm(self) -> jax.Array:
    """Mean gradient norm, the quantity NIO's constraint bounds by γ."""
    return jnp.mean(self.grad_norms)


def safe_sqrt(x):
  """`sqrt(x)` with 0 (and a zero gradient) where `x <= 0`: no NaN in the backward pass."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def gc_from_grads(grads: list | PyTree) -> tuple[jax.Array, jax.Array]:
  """(GC, norms) of a stack of gradients: every leaf has the leading axis D ≥ 2.

  Uses the identity GC = (‖Σ u_i‖² − D)/(D(D−1)). A zero gradient gives a zero unit vector
  (no NaN); callers report it through `grad_norms == 0`. Checks shapes only, so it composes
  with `jit`, `vmap` and `grad`.
  """
  d = errors.check_grad_stack(grads)
  leaves = jax.tree_util.tree_leaves(grads)
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = sum(jnp.sum(jnp.reshape(f32(g), (d, -1)) ** 2, axis=1) for g in leaves)
  norms = safe_sqrt(sq)
  inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  usum_sq = sum(
    jnp.sum(jnp.tensordot(inv, jnp.reshape(f32(g), (d, -1)), axes=1) ** 2) for g in leaves
  )
  gc = (usum_sq - d) / (d * (d - 1))
  return gc, norms


def gc_brute_force(grads) -> jax.Array:
  """Reference form: the mean off-diagonal entry of the explicit D×D cosine matrix."""
  leaves = jax.tree_util.tree_leaves(grads)
  d = leaves[0].shape[0]
  flat = jnp.concatenate([jnp.reshape(g, (d, -1)) for g in leaves], axis=1)
  norms = jnp.linalg.norm(flat, axis=1)
  cos = (flat @ flat.T) / (norms[:, None] * norms[None, :])
  return (jnp.sum(cos) - jnp.trace(cos)) / (d * d - d)


def _stats(loss_fn, params, batch, num_chunks, overlap, wrt, pullback, conv, chunk_size):
  # "auto" is resolved here, at trace time, because the batch setting's choice depends on the
  # loss (`resolve_for_loss`); a compiled `stats_jit` has it resolved once.
  pullback, conv = resolve_for_loss(loss_fn, params, batch, num_chunks, pullback, conv)
  if num_chunks is None:
    losses, grads = per_example.sample_grads_selected(
      loss_fn, params, batch, wrt, pullback, conv, chunk_size
    )
  else:
    losses, grads = per_example.subbatch_grads_selected(
      loss_fn, params, batch, num_chunks, overlap, wrt, pullback, conv
    )
  gc, norms = gc_from_grads(grads)
  loss = jnp.mean(jax.lax.stop_gradient(losses))
  return GCStats(gc=gc, grad_norms=norms, loss=loss)


def resolve_for_loss(loss_fn, params, batch, num_chunks, pullback, conv):
  """`per_example.resolve_formulation`, with the batch setting's "auto" pullback chosen for
  this loss (`per_example.auto_subbatch_pullback`: "segments" where exact, on CPU)."""
  auto = pullback in ("auto", None)
  pullback, conv = per_example.resolve_formulation(num_chunks, pullback, conv)
  if auto and num_chunks is not None:
    pullback = per_example.auto_subbatch_pullback(loss_fn, params, batch)
  return pullback, conv


def checked_formulation(num_chunks, pullback="auto", conv="auto", impl=None):
  """`(pullback, conv)` with the names checked and a deprecated `impl` mapped to its pair
  (`per_example.resolve_formulation` raises on bad input), "auto" kept: `_stats` resolves it
  for the loss when it is traced."""
  resolved = per_example.resolve_formulation(num_chunks, pullback, conv, impl)
  return resolved if impl is not None else (pullback or "auto", conv or "auto")


def gradcosine_stats(
  loss_fn,
  params,
  batch,
  *,
  num_chunks=None,
  overlap=0.0,
  wrt=None,
  pullback="auto",
  conv="auto",
  chunk_size=None,
  impl=None,
) -> GCStats:
  """Traceable core of `gradcosine` with no host-side checks (use inside jit/grad)."""
  pullback, conv = checked_formulation(num_chunks, pullback, conv, impl)
  return _stats(loss_fn, params, batch, num_chunks, overlap, wrt, pullback, conv, chunk_size)


# `stats_jit(loss_fn, params, batch, num_chunks, overlap, wrt, pullback, conv, chunk_size)`:
# the jitted statistics (`gradcosine`, `nio_jax.measure`), compiled once per loss_fn and
# setting; `pullback` / `conv` checked (`checked_formulation`), "auto" resolved in `_stats`.
stats_jit = jax.jit(per_example.canonical_convs(_stats), static_argnums=(0, 3, 4, 5, 6, 7, 8))


def gradcosine(
  loss_fn: Callable,
  params: PyTree,
  batch: PyTree,
  *,
  num_chunks: int | None = None,
  overlap: float = 0.0,
  wrt: Callable | None = None,
  pullback: str = "auto",
  conv: str = "auto",
  chunk_size: int | None = None,
  check: bool = True,
  impl: str | None = None,
) -> GCStats:
  """GradCosine of `loss_fn` at `params` on `batch`, and the gradient norms it uses.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: pytree of float arrays.
    batch: pytree with a leading batch axis `B ≥ 2`.
    num_chunks: `None` for the sample-wise GC over the B per-example gradients; an int `D`
      (2 ≤ D ≤ B) for the batch setting over D overlapping sub-batches.
    overlap: overlap ratio `r ∈ [0, 1)` of the sub-batches (batch setting only).
    wrt: optional predicate `(path, leaf) -> bool` selecting the leaves whose gradients
      enter the cosine (the released NIO code uses conv/dense/layer-norm weights and biases,
      `nio_jax.leaves.LeafKinds.grad_filter`, what the searches pass). `None` selects every
      leaf.
    pullback: how the D gradients are pulled back, see `per_example.SAMPLE_PULLBACKS` /
      `SUBBATCH_PULLBACKS`; "auto" = `per_example.default_formulation`.
    conv: how convolutions are evaluated, one of `per_example.CONVS` or "auto".
    chunk_size: sample-wise only: process this many examples (or rows) at a time.
    check: check the inputs (on concrete values only) and, when the result is concrete,
      raise `ZeroGradientError` if a gradient is zero (its cosine is undefined). Inside
      `jit` / `vmap` / `grad` the value checks skip themselves, so the defaults compose.
    impl: deprecated single-string form of earlier versions (`per_example.LEGACY_IMPLS`);
      mapped to `(pullback, conv)` with a `DeprecationWarning`.

  Returns:
    `GCStats(gc, grad_norms, loss)`. Differentiable w.r.t. `params`, and usable under
    transformations with the default arguments, e.g.
    `jax.jit(lambda s: gradcosine(loss_fn, apply_scales(params, s), batch).gc)(scales)`.

  Raises:
    ValueError: bad input, an unknown or invalid pullback / conv (the message names the
      option and its valid values), or pullback="segments" with cross-example coupling.
  """
  b = errors.check_batch(batch) if check else errors.batch_size(batch)
  errors.check_chunks(b, num_chunks, overlap)
  pullback, conv = checked_formulation(num_chunks, pullback, conv, impl)
  if check:
    errors.check_params(params)
    errors.check_loss_fn(loss_fn, params, batch)
  stats = stats_jit(loss_fn, params, batch, num_chunks, overlap, wrt, pullback, conv, chunk_size)
  if check and not isinstance(stats.gc, jax.core.Tracer):
    check_stats(stats, num_chunks)
  return stats


def check_stats(stats: GCStats, num_chunks=None, step: int | None = None, last_good=None):
  """Raises if the stats are unusable: zero gradients or non-finite values."""
  where = "" if step is None else f" at step {step}"
  norms = jax.device_get(stats.grad_norms)
  for name, value in (("loss", stats.loss), ("GradCosine", stats.gc), ("gradient norm", norms)):
    if not bool(jnp.all(jnp.isfinite(value))):
      raise errors.NonFiniteError(
        f"non-finite {name}{where}: {value}. Lower the learning rate / check the inputs; "
        "the returned result keeps the last finite params.",
        step=step or 0,
        last_good=last_good,
      )
  zero = [int(i) for i in jnp.nonzero(norms == 0)[0]]
  if zero:
    what = "example" if num_chunks is None else "sub-batch"
    raise errors.ZeroGradientError(
      f"{what}(s) {zero} have an all-zero gradient{where}, so their cosine is undefined. "
      "Typical causes: a dead network (all ReLUs off), a zero-initialised output layer "
      "(Fixup: run GradCosine after a first step), or a loss that ignores those examples.",
      zero,
    )
