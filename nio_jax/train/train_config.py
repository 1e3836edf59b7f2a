"""The training configuration (an `ml_collections.ConfigDict`) with the published CIFAR recipe
as defaults, and its validation."""

from __future__ import annotations

import ml_collections

BASELINES = ("none", "extra_epoch_constant", "extra_epoch_warmup")
SCHEDULES = ("cosine", "step", "constant")


def default_config() -> ml_collections.ConfigDict:
  """The GradInit / NIO CIFAR recipe as a training config.

  SGD(0.9), lr 0.1*B/128, per-iteration cosine over 200 epochs, weight decay 1e-4 (none on
  norm layers); without norm layers biases / scalars at lr/10 and gradient clipping at 1
  (`no_norm_recipe=True`, applied automatically when the model has no normalisation layer).

  Fields:
    num_epochs: epochs of the main schedule (a "+1 epoch" baseline adds one before it).
    batch_size: informational (the loader fixes it); used for `lr = base_lr * B / 128`.
    base_lr, lr_reference_batch: `lr = base_lr * batch_size / lr_reference_batch`
      unless `lr` is set.
    schedule: "cosine" (per iteration, to 0), "step" (multiply by `step_decay` at each of
      `step_epochs`), or "constant".
    warmup_epochs: linear warmup from 0 inside the main schedule (may be fractional).
    baseline: "none"; "extra_epoch_constant" (+1 epoch at constant lr before the main
      schedule); "extra_epoch_warmup" (+1 epoch of linear warmup 0 -> lr before it).
    momentum, nesterov, weight_decay: SGD; weight decay is coupled (added to the gradient,
      as in torch.optim.SGD) and skips norm-layer leaves.
    no_norm_recipe: None = auto (True iff the model has no normalisation layer / no
      batch_stats). When True: `slow_lr_factor` (0.1) for biases and scalar leaves and
      `grad_clip_norm` defaults to `no_norm_grad_clip` (1.0).
    grad_clip_norm: global-norm clipping threshold (None: off, or auto as above).
    mixed_precision: compute in bfloat16, keep float32 parameters / optimizer state.
    label_smoothing: cross-entropy label smoothing.
    seed: seed of dropout rngs (data seeds belong to the loader).
    eval_batch_size: evaluation batch (the last one is padded and masked).
    log_every: steps between metrics lines / progress updates / non-finite checks.
    checkpoint_every_steps: extra mid-epoch checkpoints (0: only at epoch ends).
    max_to_keep: checkpoints kept (>= 2, so a good one survives a bad write).
    train_kwarg: keyword of `model.__call__` that selects training mode (None: none).
    progress, plots: tqdm bar; PNG curves at the end of each run.
    gc_every: every this many steps (and at step 0 and the last step), call the `gc_fn`
      handed to `nio_jax.train.train` (GradCosine and gradient norm on fixed batches;
      `nio-jax train` builds it from the GC report's settings) and log the result
      (0: off).
  """
  c = ml_collections.ConfigDict()
  c.num_epochs = 200
  c.batch_size = 128
  c.base_lr = 0.1
  c.lr_reference_batch = 128
  c.lr = ml_collections.config_dict.placeholder(float)
  c.schedule = "cosine"
  c.step_epochs = (100, 150)
  c.step_decay = 0.1
  c.warmup_epochs = 0.0
  c.baseline = "none"
  c.extra_epoch_lr_factor = 1.0
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.no_norm_recipe = ml_collections.config_dict.placeholder(bool)
  c.slow_lr_factor = 0.1
  c.no_norm_grad_clip = 1.0
  c.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  c.mixed_precision = False
  c.label_smoothing = 0.0
  c.seed = 0
  c.eval_batch_size = 500
  c.log_every = 50
  c.checkpoint_every_steps = 0
  c.max_to_keep = 3
  c.train_kwarg = "train"
  c.progress = True
  c.plots = True
  c.gc_every = 0
  return c


def peak_lr(config) -> float:
  """The peak learning rate: `lr` when set, else `base_lr * batch_size / lr_reference_batch`."""
  if config.get("lr") is not None:
    return float(config.lr)
  return float(config.base_lr) * int(config.batch_size) / int(config.lr_reference_batch)


def total_epochs(config) -> int:
  """Epochs actually run: `num_epochs` plus one for the "+1 epoch" baselines."""
  return int(config.num_epochs) + (0 if config.baseline == "none" else 1)


def validate_train_config(config, prefix: str = "config") -> None:
  """Checks a training config: baseline and schedule names, `max_to_keep`, `num_epochs`,
  and the range of every numeric field. Messages name a field `<prefix>.<name>` (an
  experiment config's checks pass `prefix="train"`, so the name is the override's key).

  Raises:
    ValueError: a name is unknown or a value out of range (the message names the field).
    TypeError: a numeric field holds another type.
  """
  if config.baseline not in BASELINES:
    raise ValueError(f"{prefix}.baseline must be one of {BASELINES}, got {config.baseline!r}")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"{prefix}.schedule must be one of {SCHEDULES}, got {config.schedule!r}")
  if int(config.max_to_keep) < 2:
    raise ValueError(
      f"{prefix}.max_to_keep must be >= 2 so a good checkpoint survives a failed write"
    )
  if int(config.num_epochs) < 1:
    raise ValueError(f"{prefix}.num_epochs must be >= 1")
  _check_numbers(config, prefix)


def _number(
  config, prefix, name, *, positive=False, optional=False, lo=None, hi=None, integer=False
):
  """Checks the numeric field `name` of `config` against the given bounds."""
  import math  # noqa: PLC0415

  v = config.get(name)
  if v is None:
    if optional:
      return
    raise ValueError(f"{prefix}.{name} must be set")
  kind = "an int" if integer else "a number"
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
    raise TypeError(f"{prefix}.{name} must be {kind}, got {v!r}")
  if not math.isfinite(v):
    raise ValueError(f"{prefix}.{name}={v} must be finite")
  if positive and v <= 0:
    raise ValueError(f"{prefix}.{name}={v} must be > 0")
  if lo is not None and v < lo:
    raise ValueError(f"{prefix}.{name}={v} must be >= {lo}")
  if hi is not None and v >= hi:
    raise ValueError(f"{prefix}.{name}={v} must be < {hi}")


def _check_numbers(config, prefix: str) -> None:
  """Ranges of the numeric fields: a NaN / negative learning rate etc. fails here, naming
  the field, instead of as a NaN loss many steps later."""
  _number(config, prefix, "lr", positive=True, optional=True)
  _number(config, prefix, "base_lr", positive=True)
  _number(config, prefix, "batch_size", positive=True, integer=True)
  _number(config, prefix, "lr_reference_batch", positive=True, integer=True)
  _number(config, prefix, "momentum", lo=0.0, hi=1.0)
  _number(config, prefix, "weight_decay", lo=0.0)
  _number(config, prefix, "warmup_epochs", lo=0.0)
  _number(config, prefix, "label_smoothing", lo=0.0, hi=1.0)
  _number(config, prefix, "grad_clip_norm", positive=True, optional=True)
  _number(config, prefix, "slow_lr_factor", lo=0.0)
  _number(config, prefix, "eval_batch_size", positive=True, integer=True)
  _number(config, prefix, "log_every", positive=True, integer=True)
  _number(config, prefix, "checkpoint_every_steps", lo=0, integer=True, optional=True)
  if "gc_every" in config:  # absent in a hand-built config from before `gc_every`: off
    _number(config, prefix, "gc_every", lo=0, integer=True)
