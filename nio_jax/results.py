"""The result type shared by every initialisation method."""

from __future__ import annotations

import dataclasses
import json
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
    return len(next(iter(self.history.values()))) if self.history else 0

  def history_json(self) -> str:
    """The history (and config) as JSON, for logs and plots."""

    def conv(v):
      return np.asarray(v).tolist()

    return json.dumps(
      {
        "method": self.method,
        "config": {
          k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v))
          for k, v in self.config.items()
        },
        "history": {k: conv(v) for k, v in self.history.items()},
      }
    )


def stack_history(rows: list[dict]) -> dict[str, np.ndarray]:
  if not rows:
    return {}
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
