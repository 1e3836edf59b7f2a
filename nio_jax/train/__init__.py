"""Training: the CIFAR recipe of the GradInit / NIO papers (SGD, cosine, +1-epoch baselines),
a resumable trainer with Orbax checkpoints, JSON-lines metrics and plots.

Where things are: the config and its validation in `train_config`, the optimizer in
`optim`, the schedules in `schedules`, the training state and the compiled steps in
`steps`, the loop in `trainer` (what it records in `progress`), checkpoints in
`checkpoint`, the metrics log and curves in `metrics`, the padded test batches in
`eval_data`.
"""

from nio_jax.train.checkpoint import Checkpointer
from nio_jax.train.metrics import MetricsLog, logged_recipe, plot_curves, read_metrics
from nio_jax.train.optim import (
  decay_mask,
  has_norm_layers,
  make_optimizer,
  param_labels,
)
from nio_jax.train.progress import TrainResult
from nio_jax.train.schedules import main_schedule, make_schedule
from nio_jax.train.steps import TrainState, build_steps
from nio_jax.train.train_config import (
  BASELINES,
  SCHEDULES,
  default_config,
  peak_lr,
  total_epochs,
  validate_train_config,
)
from nio_jax.train.trainer import NonFiniteLossError, TrainingPreempted, default_gc_fn, train

__all__ = [
  "BASELINES",
  "Checkpointer",
  "MetricsLog",
  "NonFiniteLossError",
  "SCHEDULES",
  "TrainResult",
  "TrainState",
  "TrainingPreempted",
  "build_steps",
  "decay_mask",
  "default_config",
  "default_gc_fn",
  "has_norm_layers",
  "logged_recipe",
  "main_schedule",
  "make_optimizer",
  "make_schedule",
  "param_labels",
  "peak_lr",
  "plot_curves",
  "read_metrics",
  "total_epochs",
  "train",
  "validate_train_config",
]
