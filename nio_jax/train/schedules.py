"""Learning-rate schedules (per iteration) of the recipes, including the "+1 epoch" baselines
of the GradInit paper's table."""

from __future__ import annotations

import optax

from nio_jax.train.train_config import peak_lr


def main_schedule(config, steps_per_epoch: int, lr: float | None = None) -> optax.Schedule:
  """The main schedule over `num_epochs * steps_per_epoch` iterations (with optional
  linear warmup of `warmup_epochs`)."""
  lr = peak_lr(config) if lr is None else lr
  total = int(config.num_epochs) * steps_per_epoch
  warm = int(round(float(config.warmup_epochs) * steps_per_epoch))
  if warm >= total:
    raise ValueError("warmup_epochs must be shorter than num_epochs")
  if config.schedule == "cosine":
    # torch CosineAnnealingLR(T_max=total) stepped every iteration: lr*(1+cos(pi t/T))/2.
    body = optax.cosine_decay_schedule(lr, decay_steps=total - warm)
  elif config.schedule == "step":
    bounds = {
      int(round(e * steps_per_epoch)) - warm: float(config.step_decay) for e in config.step_epochs
    }
    body = optax.piecewise_constant_schedule(lr, {b: f for b, f in bounds.items() if b > 0})
  else:
    body = optax.constant_schedule(lr)
  if warm == 0:
    return body
  return optax.join_schedules([linear_warmup(lr, warm), body], [warm])


def linear_warmup(lr: float, steps: int) -> optax.Schedule:
  """`lr * (t + 1) / steps` for `t < steps` (no wasted step at lr 0)."""
  if steps <= 1:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(lr / steps, lr, steps - 1)


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The full schedule, including the "+1 epoch" baselines.

  * `extra_epoch_constant`: one epoch at `extra_epoch_lr_factor * lr` then the main
    schedule (which starts over from its own step 0).
  * `extra_epoch_warmup`: one epoch of linear warmup `lr*(t+1)/steps_per_epoch`, then the main schedule.
  """
  lr = peak_lr(config)
  main = main_schedule(config, steps_per_epoch, lr)
  if config.baseline == "none":
    return main
  if config.baseline == "extra_epoch_constant":
    pre = optax.constant_schedule(lr * float(config.extra_epoch_lr_factor))
  elif config.baseline == "extra_epoch_warmup":
    pre = linear_warmup(lr, steps_per_epoch)
  else:
    raise ValueError(f"unknown baseline {config.baseline!r}")
  return optax.join_schedules([pre, main], [steps_per_epoch])
