"""The result type shared by every initialisation method."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class InitResult:
  """What an initialisation method returns.

  Attributes:
    params: the initialised parameters, ready for training (same structure/dtypes as input).
    scales: the per-tensor scales that produced them (`params = apply_scales(θ0, scales)`),
      or None for methods that do not learn scales (Kaiming, Fixup).
    history: per-step record, a dict of equal-length numpy arrays (e.g. `gc`,
      `grad_norm`, `constraint`, `objective`, `loss`); empty for one-shot methods.
    method: the method's registry name.
    config: the configuration that ran, as a plain dict.
  """

  params: PyTree
  scales: PyTree | None
  history: dict[str, np.ndarray]
  method: str = ""
  config: dict = dataclasses.field(default_factory=dict)

  @property
  def num_steps(self) -> int:
    """The number of steps recorded in `history` (0 when it is empty)."""
    return len(next(iter(self.history.values()))) if self.history else 0


def stack_history(rows: list[dict]) -> dict[str, np.ndarray]:
  """Per-step rows `[{key: value}, ...]` as `{key: array}` stacked along a step axis."""
  if not rows:
    return {}
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
