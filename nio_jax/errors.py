"""The exception types nio_jax raises beyond `ValueError` / `TypeError`.

The input checks that raise them (and the plain `ValueError` / `TypeError` of bad input) are
in `nio_jax.checks`.
"""

from __future__ import annotations

from typing import Any


class NonFiniteError(ValueError):
  """A loss, GradCosine or gradient norm became NaN/inf during a search or training.

  Attributes:
    step: the 0-based step at which the non-finite value appeared.
    last_good: the last result whose values were all finite (for a search, an
      `InitResult` holding the params/scales from *before* the failing step), or None.
  """

  def __init__(self, message: str, step: int, last_good: Any = None):
    super().__init__(message)
    self.step = step
    self.last_good = last_good


class ZeroGradientError(ValueError):
  """An example (or sub-batch) has an all-zero gradient, so its cosine is undefined."""

  def __init__(self, message: str, indices):
    super().__init__(message)
    self.indices = list(indices)


class LossFnError(ValueError):
  """`loss_fn(params, batch)` could not be traced on the first batch (wrong params tree,
  missing batch key, shape mismatch, ...). The original exception is `__cause__`."""


class ConfigError(Exception):
  """A user error in an experiment config, an override or a run directory's files.

  The CLI prints it as `nio-jax: error: ...` and exits with status 2.
  """


class DivergedError(Exception):
  """A training run diverged: its loss became NaN/inf (`nio-jax train`).

  The run's record says where (`status`); its last good checkpoint is intact. The CLI
  prints it as `nio-jax: error: ...` and exits with status 1.
  """
