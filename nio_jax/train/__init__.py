"""Training: the CIFAR recipe of the GradInit / NIO papers (SGD, cosine, +1-epoch baselines),
a resumable trainer with Orbax checkpoints, JSON-lines metrics and plots."""

from nio_jax.train.checkpoint import Checkpointer
from nio_jax.train.config import BASELINES, SCHEDULES, default_config, peak_lr, total_epochs
from nio_jax.train.metrics import MetricsLog, logged_recipe, plot_curves, read_metrics
from nio_jax.train.optim import (
  decay_mask,
  has_norm_layers,
  make_optimizer,
  param_labels,
)
from nio_jax.train.schedules import main_schedule, make_schedule
from nio_jax.train.trainer import NonFiniteLossError, TrainResult, init_loss_fn, train

__all__ = [
  "BASELINES",
  "Checkpointer",
  "MetricsLog",
  "NonFiniteLossError",
  "SCHEDULES",
  "TrainResult",
  "decay_mask",
  "default_config",
  "has_norm_layers",
  "init_loss_fn",
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
]
