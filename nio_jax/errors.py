"""The exception types nio_jax raises beyond `ValueError` / `TypeError`.

The input checks that raise them (and the plain `ValueError` / `TypeError` of bad input) are
in `nio_jax.checks`.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)


def user_stacklevel() -> int:
  """The `stacklevel` that makes a `warnings.warn` issued by the calling function point at the
  first frame outside nio_jax: the user's call, however many library frames (e.g.
  `methods.initialize` -> the method -> its input checks) lie in between."""
  level, frame = 1, sys._getframe(1)
  while frame is not None and str(pathlib.Path(frame.f_code.co_filename).resolve()).startswith(
    _PACKAGE_DIR
  ):
    level, frame = level + 1, frame.f_back
  return level


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
