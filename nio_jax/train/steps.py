"""The trainer's compiled steps: the training state, one SGD step and one evaluation step.

As in the Flax examples' `train.py`, the steps are module-level functions of a small state
type: `train_step(spec, state, sums, batch)` and `eval_step(spec, state, batch)`, where
`spec` (a `StepSpec`) holds what does not change during a run (the model, the optimizer,
the loss settings). `build_steps` binds them to a model and a training config and compiles
them once per process for each (model, step-relevant config) pair (`STEPS`), so the seeds
of a sweep cell and the methods of `nio-jax compare` share one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from nio_jax.jaxpr_rewrites import canonical_convs
from nio_jax.step_cache import StepCache
from nio_jax.train.optim import make_optimizer

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """The training state that the steps carry and the checkpoints hold.

  Attributes:
    step: the global step (int32 scalar).
    params: the model's parameters.
    opt_state: the optimizer's state.
    rng: key data of the dropout key (folded with `step` in each step).
    bad_step: the first step whose loss was not finite, -1 while all were.
    batch_stats: the running batch statistics (None for models without batch norm).
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  bad_step: jax.Array
  batch_stats: PyTree = None

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The state at step 0 of `variables` (`{"params", ["batch_stats"]}`).

    The arrays are copies: the train step donates its state on accelerators, and the
    caller's arrays must stay valid.
    """
    v = jax.tree.map(lambda x: jnp.array(x, copy=True), variables)
    has_bs = bool(jax.tree_util.tree_leaves(v.get("batch_stats", {})))
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      opt_state=tx.init(v["params"]),
      rng=jax.random.key_data(jax.random.key(int(seed))),
      bad_step=jnp.full((), -1, jnp.int32),
      batch_stats=v["batch_stats"] if has_bs else None,
    )

  @classmethod
  def from_dict(cls, d: dict) -> TrainState:
    """The state of a checkpoint's `state` item (`as_dict`'s layout)."""
    return cls(**d)

  def as_dict(self) -> dict:
    """The state as the dict a checkpoint holds (no `batch_stats` key without them)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if self.batch_stats is None:
      del d["batch_stats"]
    return d

  def variables(self) -> dict:
    """`{"params", ["batch_stats"]}`: the model's variables in this state."""
    if self.batch_stats is None:
      return {"params": self.params}
    return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the steps hold fixed: the model, the optimizer and the loss settings.

  Attributes:
    model: the linen model (float32 parameters).
    compute_model: the model that computes (a bfloat16 clone under `mixed_precision` when
      the model has a `dtype` attribute, else `model`).
    tx: the optimizer.
    train_kwarg: keyword of `model.__call__` that selects training mode (None: none).
    mixed_precision: compute in bfloat16 (inputs, and params when there is no clone).
    label_smoothing: cross-entropy label smoothing of the training loss.
  """

  model: Any
  compute_model: Any
  tx: optax.GradientTransformation
  train_kwarg: str | None
  mixed_precision: bool
  label_smoothing: float


@dataclasses.dataclass(frozen=True)
class Steps:
  """What `build_steps` returns.

  Attributes:
    train_step: jitted `(state, sums, batch) -> (state, sums)`.
    eval_step: jitted `(state, batch) -> [loss sum, correct]` over the batch's `mask`.
    tx: the optimizer.
    schedule: its learning-rate schedule.
  """

  train_step: Callable
  eval_step: Callable
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def cross_entropy(logits, labels, num_classes: int, smoothing: float):
  """Per-example softmax cross-entropy in float32, with optional label smoothing."""
  logits = logits.astype(jnp.float32)
  if smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits, targets)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cast_floats(tree: PyTree, dtype) -> PyTree:
  """`tree` with its floating-point leaves cast to `dtype` (other leaves unchanged)."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def forward(spec: StepSpec, params, batch_stats, x, *, train: bool, rng):
  """`(logits in float32, batch statistics)` of the model on images `x`.

  In training mode with batch norm the statistics are the updated running ones; otherwise
  `batch_stats` is returned unchanged.
  """
  v = {"params": params}
  if batch_stats is not None:
    v["batch_stats"] = batch_stats
  if spec.mixed_precision:
    x = x.astype(jnp.bfloat16)
    if spec.compute_model is spec.model:
      v = {**v, "params": cast_floats(params, jnp.bfloat16)}
  kw = {spec.train_kwarg: train} if spec.train_kwarg else {}
  if train and batch_stats is not None:
    logits, upd = spec.compute_model.apply(
      v, x, mutable=["batch_stats"], rngs={"dropout": rng}, **kw
    )
    return logits.astype(jnp.float32), cast_floats(upd["batch_stats"], jnp.float32)
  out = spec.compute_model.apply(v, x, rngs={"dropout": rng} if train else None, **kw)
  return out.astype(jnp.float32), batch_stats


def train_step(spec: StepSpec, state: TrainState, sums, batch) -> tuple[TrainState, jax.Array]:
  """One SGD step on `batch`.

  Args:
    spec: the model, optimizer and loss settings.
    state: the state before the step.
    sums: `[2, 3]` accumulators `[loss * n, correct, n]` (row 0 the log window, row 1 the
      epoch); the batch's values are added to both rows.
    batch: `{"image", "label"}`.

  Returns:
    `(state after the step, sums)`. A non-finite loss does not stop the step: its step is
    recorded in `bad_step` (the first one only), for the host loop to check.
  """
  step = state.step
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
  labels = batch["label"]

  def loss_fn(params):
    logits, new_bs = forward(spec, params, state.batch_stats, batch["image"], train=True, rng=rng)
    loss = cross_entropy(logits, labels, logits.shape[-1], spec.label_smoothing).mean()
    return loss, (logits, new_bs)

  (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bad = jnp.where((state.bad_step < 0) & ~jnp.isfinite(loss), step, state.bad_step)
  state = state.replace(
    step=step + 1, params=params, opt_state=opt_state, bad_step=bad, batch_stats=new_bs
  )
  n = labels.shape[0]
  correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  sums = sums + jnp.stack([loss * n, correct, jnp.float32(n)])[None, :]
  return state, sums


def eval_step(spec: StepSpec, state: TrainState, batch) -> jax.Array:
  """`[sum of losses, number correct]` of the model in evaluation mode over the examples
  of `batch` whose `mask` is 1 (a padded last batch)."""
  logits, _ = forward(spec, state.params, state.batch_stats, batch["image"], train=False, rng=None)
  losses = cross_entropy(logits, batch["label"], logits.shape[-1], 0.0)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  m = batch["mask"]
  return jnp.stack([jnp.sum(losses * m), jnp.sum(correct * m)])


# Compiled steps of this process; a few (model, config) pairs are enough for a sweep cell or a
# comparison, and an evicted pair only costs a recompilation.
STEPS = StepCache("train", maxsize=4)

# Training-config keys that never change the compiled steps (logging, progress, checkpoint
# cadence, evaluation batch): left out of the cache key, so that runs which differ only
# there (e.g. the methods of `nio-jax compare`) share one compilation.
_NOT_IN_STEPS = (
  "progress",
  "plots",
  "log_every",
  "max_to_keep",
  "checkpoint_every_steps",
  "gc_every",
  "eval_batch_size",
)


def _step_config_key(config) -> str:
  """The part of the training config that the compiled steps depend on, as sorted JSON."""
  d = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_STEPS}
  return json.dumps(d, sort_keys=True, default=str)


def build_steps(model, config, steps_per_epoch: int, has_batch_stats: bool, no_norm: bool) -> Steps:
  """The jitted steps of `model` under the training `config`, with its optimizer.

  Cached in `STEPS` on (model, the step-relevant part of `config`, steps per epoch, batch
  norm or not, the no-norm recipe or not, the backend): repeated and resumed runs in one
  process compile once. A model with an unhashable attribute is not cached.
  """
  key = (
    model,
    _step_config_key(config),
    steps_per_epoch,
    has_batch_stats,
    no_norm,
    jax.default_backend(),
  )
  return STEPS.get(key, lambda: _compile(model, config, steps_per_epoch, no_norm))


def _compile(model, config, steps_per_epoch: int, no_norm: bool) -> Steps:
  """The steps of `build_steps`, built and jitted (no cache)."""
  tx, schedule = make_optimizer(config, None, steps_per_epoch, no_norm=no_norm)
  mixed = bool(config.mixed_precision)
  spec = StepSpec(
    model=model,
    compute_model=model.clone(dtype=jnp.bfloat16) if mixed and hasattr(model, "dtype") else model,
    tx=tx,
    train_kwarg=config.train_kwarg,
    mixed_precision=mixed,
    label_smoothing=float(config.label_smoothing),
  )
  donate = () if jax.default_backend() == "cpu" else (0, 1)
  # canonical_convs: the scanned blocks' backward convolutions on XLA:CPU (jaxpr_rewrites).
  return Steps(
    train_step=jax.jit(canonical_convs(functools.partial(train_step, spec)), donate_argnums=donate),
    eval_step=jax.jit(functools.partial(eval_step, spec)),
    tx=tx,
    schedule=schedule,
  )
