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

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nio_jax import leaves, stochastic

PyTree = Any


def classification_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, `[B]`."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels.astype(jnp.int32)
  )


# ------------------------------------------------------------------ batches and flags

_INPUT_KEYS = ("image", "images", "x", "inputs", "input", "features", "data")
_LABEL_KEYS = ("label", "labels", "y", "targets", "target")
_TRAIN_FLAGS = ("train", "training", "is_training")
_EVAL_FLAGS = ("deterministic", "use_running_average", "eval")

Accessor = str | int | Callable[[PyTree], Any] | None


def _access(batch, acc: Accessor, role: str):
  """The `role` ("inputs" / "labels") part of a user batch (see `linen_loss_fn`)."""
  if callable(acc):
    return acc(batch)
  if acc is not None:
    try:
      return batch[acc]
    except (KeyError, IndexError, TypeError) as e:
      what = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
      raise KeyError(
        f"{role}={acc!r} is not in the batch ({what}); pass {role}= a key, an index or a "
        f"function batch -> {role}."
      ) from e
  if isinstance(batch, (tuple, list)):
    i = 0 if role == "inputs" else 1
    if len(batch) > i:
      return batch[i]
  elif isinstance(batch, Mapping):
    for k in _INPUT_KEYS if role == "inputs" else _LABEL_KEYS:
      if k in batch:
        return batch[k]
  elif role == "inputs" and hasattr(batch, "shape"):
    return batch  # a bare array is the inputs
  shown = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
  raise KeyError(
    f"cannot find the {role} in the batch ({shown}): a tuple batch is read as (inputs, labels), "
    f"a dict by the keys {_INPUT_KEYS if role == 'inputs' else _LABEL_KEYS}. Pass "
    f"{role}='your_key' (or an index, or a function batch -> {role}) to the adapter."
    + (" LSUV reads only the inputs (it runs `loss_fn.forward`)." if role == "labels" else "")
  )


def train_flag_of(method) -> str | None:
  """The keyword of `method` (a module's `__call__`) that switches training mode: the first
  of `train`, `training`, `is_training`, `deterministic`, `use_running_average`, `eval` in
  its signature, or None."""
  try:
    params = inspect.signature(method).parameters
  except (TypeError, ValueError):
    return None
  for name in (*_TRAIN_FLAGS, *_EVAL_FLAGS):
    p = params.get(name)
    if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
      return name
  return None


def _flag_value(flag: str, train: bool) -> bool:
  """`train` for a training flag, `not train` for an evaluation flag (`deterministic`)."""
  return (not train) if flag in _EVAL_FLAGS else train


def _stream_keys(key, streams) -> dict:
  return {s: jax.random.fold_in(key, i) for i, s in enumerate(streams)}


def _no_linen_dropout(next_fun, args, kwargs, context):
  """`nn.intercept_methods` interceptor that turns dropout off everywhere: every
  `nn.Dropout` call is the identity (what a deterministic dropout returns), and a module with
  its own dropout (`dropout_rate` and `deterministic` fields: the attention modules) runs
  deterministically, whatever its `deterministic` attribute or argument says."""
  import flax.linen as nn

  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.Dropout):
    return args[0] if args else kwargs["inputs"]
  fields = getattr(type(module), "__dataclass_fields__", {})
  if "dropout_rate" in fields and "deterministic" in fields:
    if module.deterministic is None:
      return next_fun(*args, **{**kwargs, "deterministic": True})
    # The attribute is set (flax refuses the argument then): switch it for this call only.
    old = module.deterministic
    object.__setattr__(module, "deterministic", True)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "deterministic", old)
  return next_fun(*args, **kwargs)


def _dropout_seed(dropout, seed) -> int | None:
  if dropout not in (True, False):
    raise ValueError(f"dropout={dropout!r} must be True (as in training) or False (off).")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f"seed={seed!r} must be an int (the seed of the dropout keys).")
  return seed if dropout else None


def linen_loss_fn(
  model,
  *,
  batch_stats: PyTree | None = None,
  train: bool = True,
  train_flag: str | None = "auto",
  dropout: bool = True,
  seed: int = 0,
  rng_streams: tuple[str, ...] = ("dropout",),
  apply_kwargs: dict | None = None,
  axis_name: str | None = None,
  inputs: Accessor = None,
  labels: Accessor = None,
  losses: Callable = classification_losses,
  image_key: str | None = None,
  label_key: str | None = None,
) -> Callable:
  """`loss_fn(params, batch) -> [B]` for a linen classifier.

  Training mode. `train=True` (the default) runs the model as in training: its training
  flag is set (`train_flag="auto"` finds it in `model.__call__`'s signature: `train`,
  `training` or `is_training` get `train`; `deterministic`, `use_running_average` or `eval`
  get `not train`; name it yourself for another spelling, or None to pass none). With
  `batch_stats`, batch norm normalises by the batch's own statistics (`mutable=
  ["batch_stats"]`) and the updated statistics are discarded: your variables never change.

  Dropout. `dropout=True` (the default) keeps dropout on, as in training, with a fresh key
  for every batch the search draws (`loss_fn.rng_seed = seed`; `nio_jax.stochastic`): each
  stream in `rng_streams` gets its own key. `dropout=False` turns every `nn.Dropout` off
  (deterministic) while batch norm stays in training mode, and the loss is deterministic.

  Batches. Any pytree: `inputs` / `labels` say where the model's inputs and the labels
  are, as a key, an index or a function `batch -> value`. By default a tuple/list batch is
  `(inputs, labels)`, a dict is read at the first of `image`, `images`, `x`, `inputs`, ...
  and `label`, `labels`, `y`, `targets`, ..., and a bare array is the inputs.
  `loss_fn.forward(params, batch)` returns the model's outputs from the inputs only (LSUV
  uses it, so its batches need no labels).

  Args:
    model: a `flax.linen.Module` returning logits.
    batch_stats: the model's `batch_stats` collection, or None for models without BN.
    train: training mode (True) or evaluation mode (False) for the search.
    train_flag: the keyword of `model.__call__` that switches mode; "auto" (find it), a
      name, or None (pass none).
    dropout: dropout on, as in training (True), or off (False).
    seed: the seed of the per-batch dropout keys.
    rng_streams: the linen RNG streams the model draws from during training.
    apply_kwargs: extra keyword arguments of `model.apply`; they are merged with the training
      flag and the RNG streams (yours win where both name the same thing).
    axis_name: the axis name the model's collectives use (e.g. flax's ImageNet ResNet builds
      `nn.BatchNorm(axis_name="batch")` for `pmap`): the model is applied under a
      one-element `jax.vmap(axis_name=...)`, so those means are over the batch itself.
    inputs, labels: where the inputs and labels are in a batch (see above).
    losses: `(logits, labels) -> [B]`.
    image_key, label_key: older names of `inputs` / `labels`.

  Returns:
    `loss_fn(params, batch) -> [B]`, with attributes `module_kinds` (the modules that own
    `batch_stats` are batch norm, for `nio_jax.leaves`), `forward` and `rng_seed`.
  """
  import flax.linen as nn

  inputs = image_key if inputs is None and image_key is not None else inputs
  labels = label_key if labels is None and label_key is not None else labels
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}.")
  rng_seed = _dropout_seed(dropout, seed)
  extra = dict(apply_kwargs or {})
  flag = train_flag_of(model.__call__) if train_flag == "auto" else train_flag
  if train_flag not in ("auto", None) and not isinstance(train_flag, str):
    raise TypeError(f"train_flag={train_flag!r} must be 'auto', a keyword name or None.")
  kwargs = {}
  if flag is not None and flag not in extra:
    kwargs[flag] = _flag_value(flag, train)
  user_rngs = extra.pop("rngs", None) or {}
  kwargs.update(extra)
  fixed_key = jax.random.PRNGKey(seed)

  def apply(variables, x, **call):
    if axis_name is None:
      return model.apply(variables, x, **call)
    one = jax.vmap(lambda v, xi: model.apply(v, xi, **call), in_axes=(None, 0), axis_name=axis_name)
    return jax.tree_util.tree_map(lambda a: a[0], one(variables, x[None]))

  def forward(params, batch):
    data, key = stochastic.split(batch)
    x = _access(data, inputs, "inputs")
    call = dict(kwargs)
    if rng_seed is not None:
      call["rngs"] = {**_stream_keys(fixed_key if key is None else key, rng_streams), **user_rngs}
    elif user_rngs:
      call["rngs"] = dict(user_rngs)
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
      call["mutable"] = ["batch_stats"]
    if rng_seed is None:
      with nn.intercept_methods(_no_linen_dropout):
        out = apply(variables, x, **call)
    else:
      out = apply(variables, x, **call)
    return out[0] if batch_stats is not None else out

  def loss_fn(params, batch):
    data, _ = stochastic.split(batch)
    return losses(forward(params, batch), _access(data, labels, "labels"))

  loss_fn.module_kinds = linen_module_kinds({"batch_stats": batch_stats})
  loss_fn.forward = forward
  loss_fn.rng_seed = rng_seed
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
  train: bool = True,
  dropout: bool = True,
  seed: int = 0,
  call_kwargs: dict | None = None,
  inputs: Accessor = None,
  labels: Accessor = None,
  losses: Callable = classification_losses,
  image_key: str | None = None,
  label_key: str | None = None,
) -> tuple[Callable, PyTree]:
  """`(loss_fn, params)` for an NNX classifier; `params` is its `nnx.Param` state.

  Each call merges a *fresh copy* of the model (`nnx.merge(..., copy=True)`) from its graph,
  the `params` it is given and the rest of its state (batch statistics, RNG state, ...) as
  it was when `nnx_loss_fn` was called. So the loss can be traced, differentiated and
  vmapped, and the model object itself never changes: not its batch statistics (updated in
  the copy and discarded), not its RNG counters. Put the result back with
  `nnx.update(model, result.params)`.

  Mode. `train=True` puts the copy in training mode (`Module.train()`: `nnx.BatchNorm`
  normalises by the batch's statistics, `nnx.Dropout` is on); `train=False` in evaluation
  mode (`Module.eval()`). `dropout=True` (the default) keeps dropout on with a fresh key for
  every batch the search draws (`loss_fn.rng_seed = seed`, `nio_jax.stochastic`): every
  `nnx.Rngs` stream of the copy is reseeded from the batch's key. `dropout=False` turns every
  `nnx.Dropout` off (deterministic) while batch norm stays in training mode.

  Batches: `inputs` / `labels` as in `linen_loss_fn`; `call_kwargs` are passed to the
  model's `__call__`. An `nnx.Rngs` among them (a model that takes its dropout `rngs` as a
  call argument) is replaced on every call by a fresh `nnx.Rngs` with the same streams,
  seeded from the batch's key, so the loss never mutates the object you passed. `loss_fn.forward(params, batch)` returns the outputs from the inputs
  only, `loss_fn.module_kinds` the model's module kinds (`nnx_module_kinds`).
  """
  from flax import nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}.")
  inputs = image_key if inputs is None and image_key is not None else inputs
  labels = label_key if labels is None and label_key is not None else labels
  rng_seed = _dropout_seed(dropout, seed)
  call = dict(call_kwargs or {})
  call_streams = {
    k: sorted({str(n.tag) for _, n in nnx.iter_graph(v) if isinstance(n, nnx.RngStream)})
    for k, v in call.items()
    if isinstance(v, nnx.Rngs)
  }
  module_kinds = nnx_module_kinds(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Snapshot the rest of the state now: later changes to the model do not leak into the loss.
  rest = jax.tree_util.tree_map(lambda v: v, rest)
  streams = sorted(
    {str(node.tag) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
  )
  fixed_key = jax.random.PRNGKey(seed)

  def forward(p, batch):
    data, key = stochastic.split(batch)
    m = nnx.merge(graphdef, p, rest, copy=True)
    if train:
      m.train()
    else:
      m.eval()
    if rng_seed is None:
      for _, node in nnx.iter_graph(m):
        if isinstance(node, nnx.Dropout):
          node.deterministic = True
    elif streams:
      # "match_shape": a stream of a vmapped / scanned stack of layers holds one key per
      # layer; each gets its own split of the batch's key.
      nnx.reseed(
        m, policy="match_shape", **_stream_keys(fixed_key if key is None else key, streams)
      )
    kw = dict(call)
    for i, (name, names) in enumerate(call_streams.items()):
      base = jax.random.fold_in(fixed_key if key is None else key, 1_000_003 + i)
      kw[name] = nnx.Rngs(**_stream_keys(base, names))
    return m(_access(data, inputs, "inputs"), **kw)

  def loss_fn(p, batch):
    data, _ = stochastic.split(batch)
    return losses(forward(p, batch), _access(data, labels, "labels"))

  loss_fn.module_kinds = module_kinds
  loss_fn.forward = forward
  loss_fn.rng_seed = rng_seed
  return loss_fn, params
