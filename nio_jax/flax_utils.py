"""Flax adapters: turn a linen or NNX model into the core's `loss_fn(params, batch) -> [B]`.

The core library never imports Flax; this module is the only bridge.

Batch-norm (linen): pass the model's `batch_stats`. The returned loss applies the model in
training mode with `mutable=["batch_stats"]` and *discards* the updated statistics, so a
search sees batch statistics (as the released code does) and the running statistics in your
variables are never modified. The search tunes `variables["params"]` only; put the result
back with `{**variables, "params": result.params}`.

NNX: `nnx_loss_fn(model)` splits the model into its graph, `nnx.Param` state (what the
search tunes) and the rest; the loss merges a fresh copy for each call, so the model object
itself is untouched until you call `nnx.update(model, result.params)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def classification_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, `[B]`."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels.astype(jnp.int32)
  )


def linen_loss_fn(
  model,
  *,
  batch_stats: PyTree | None = None,
  apply_kwargs: dict | None = None,
  image_key: str = "image",
  label_key: str = "label",
  losses: Callable = classification_losses,
) -> Callable:
  """`loss_fn(params, batch) -> [B]` for a linen classifier.

  Args:
    model: a `flax.linen.Module` returning logits.
    batch_stats: the model's `batch_stats` collection, or None for models without BN.
    apply_kwargs: extra keyword arguments of `model.apply` (default: `train=True` when
      `batch_stats` is given, nothing otherwise).
    image_key, label_key: keys of the batch dict.
    losses: `(logits, labels) -> [B]`.
  """
  if apply_kwargs is None:
    apply_kwargs = {"train": True} if batch_stats is not None else {}
  kwargs = dict(apply_kwargs)

  def loss_fn(params, batch):
    x, y = batch[image_key], batch[label_key]
    if batch_stats is not None:
      logits, _ = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"], **kwargs
      )
    else:
      logits = model.apply({"params": params}, x, **kwargs)
    return losses(logits, y)

  return loss_fn


def nnx_loss_fn(
  model,
  *,
  image_key: str = "image",
  label_key: str = "label",
  losses: Callable = classification_losses,
) -> tuple[Callable, PyTree]:
  """`(loss_fn, params)` for an NNX classifier; `params` is its `nnx.Param` state."""
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch):
    m = nnx.merge(graphdef, p, rest)
    return losses(m(batch[image_key]), batch[label_key])

  return loss_fn, params
