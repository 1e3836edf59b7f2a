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

Structure for the leaf classification (`nio_jax.leaves`): the core sees only params and a
loss function, never `batch_stats` or NNX module types, yet batch-norm and layer-norm
parameters look the same (`scale`, `bias`). So both adapters attach to the loss function they
return a `module_kinds` attribute (module path -> "batch_norm" / "layer_norm" / "linear" /
"other"): for linen, every module that owns `batch_stats` is batch norm
(`linen_module_kinds`); for NNX, the module's type decides (`nnx_module_kinds`). The searches
(`nio`, `measure`, `gradinit`, `metainit`, `initialize`) read it by default, so GradCosine
takes exactly the conv, dense and layer-norm leaves, and biases are found on NNX paths too.
If you wrap the returned loss in your own function, copy the attribute
(`wrapped.module_kinds = loss_fn.module_kinds`) or pass `grad_filter=
nio_jax.leaves.classify(params, module_kinds).grad_filter`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nio_jax import leaves

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

  Returns:
    `loss_fn(params, batch) -> [B]`, whose `module_kinds` attribute marks the modules that own
    `batch_stats` as batch norm (`linen_module_kinds`; read by the searches' leaf
    classification, `nio_jax.leaves`).
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

  loss_fn.module_kinds = linen_module_kinds({"batch_stats": batch_stats})
  return loss_fn


def linen_module_kinds(variables: PyTree) -> dict[tuple[str, ...], str]:
  """`{module path: "batch_norm"}` for every linen module that owns `batch_stats`.

  The other modules are classified from the params' structure (`nio_jax.leaves.classify`):
  holding `kernel` = conv/dense, only `scale`/`bias` = layer norm (no batch statistics).
  """
  if not isinstance(variables, dict) and not hasattr(variables, "get"):
    raise TypeError(f"variables must be a dict of collections, got {type(variables).__name__}.")
  return leaves.batch_stats_modules(variables.get("batch_stats"))


def linen_leaf_kinds(variables: PyTree) -> leaves.LeafKinds:
  """The `LeafKinds` of `variables["params"]`, with batch norm known from `batch_stats`."""
  return leaves.classify(variables["params"], linen_module_kinds(variables))


def _nnx_type_kinds():
  from flax import nnx

  table = (
    ("batch_norm", ("BatchNorm",)),
    ("layer_norm", ("LayerNorm", "RMSNorm", "GroupNorm")),
    ("linear", ("Linear", "LinearGeneral", "Conv", "ConvTranspose", "Einsum")),
    ("other", ("Embed",)),
  )
  return [(kind, tuple(getattr(nnx, n) for n in names if hasattr(nnx, n))) for kind, names in table]


def nnx_module_kinds(model) -> dict[tuple[str, ...], str]:
  """Module path -> kind for an NNX model, by module type (`nnx.BatchNorm` is batch norm,
  `nnx.LayerNorm` / `RMSNorm` / `GroupNorm` layer norm, `nnx.Linear` / `Conv` / ... linear,
  `nnx.Embed` other). A module of another type that holds `nnx.BatchStat` variables is batch
  norm; the rest are classified from the params' structure (`nio_jax.leaves.classify`)."""
  from flax import nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}.")
  types = _nnx_type_kinds()
  out: dict[tuple[str, ...], str] = {}
  for path, node in nnx.iter_graph(model):
    names = tuple(str(k) for k in path)
    if isinstance(node, nnx.BatchStat) and names:
      out.setdefault(names[:-1], "batch_norm")
    elif isinstance(node, nnx.Module):
      for kind, classes in types:
        if classes and isinstance(node, classes):
          out[names] = kind
          break
  return out


def nnx_leaf_kinds(model) -> leaves.LeafKinds:
  """The `LeafKinds` of an NNX model's `nnx.Param` state, by module type."""
  from flax import nnx

  return leaves.classify(nnx.state(model, nnx.Param), nnx_module_kinds(model))


def nnx_loss_fn(
  model,
  *,
  image_key: str = "image",
  label_key: str = "label",
  losses: Callable = classification_losses,
) -> tuple[Callable, PyTree]:
  """`(loss_fn, params)` for an NNX classifier; `params` is its `nnx.Param` state.

  `loss_fn.module_kinds` holds the model's module kinds (`nnx_module_kinds`)."""
  from flax import nnx

  module_kinds = nnx_module_kinds(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch):
    m = nnx.merge(graphdef, p, rest)
    return losses(m(batch[image_key]), batch[label_key])

  loss_fn.module_kinds = module_kinds
  return loss_fn, params
