"""The result type shared by every initialisation method."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True, repr=False)
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

  def __repr__(self) -> str:
    """One line: the method, its steps, the params and scales in numbers (not every array),
    and the last step's scalar metrics. The arrays are `.params`, `.scales`, `.history`."""
    parts = [f"method={self.method!r}", f"steps={self.num_steps}"]
    try:
      leaves = jax.tree_util.tree_leaves(self.params)
      size = sum(int(np.size(x)) for x in leaves)
      parts.append(f"params={len(leaves)} leaves/{size:,} values")
      if self.scales is not None:
        s = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(self.scales)]
        flat = np.concatenate(s) if s else np.zeros(0)
        rng = f" in [{flat.min():.3g}, {flat.max():.3g}]" if flat.size else ""
        parts.append(f"scales={flat.size}{rng}")
      final = {}
      for k, v in (self.history or {}).items():
        a = np.asarray(v)
        if a.ndim == 1 and a.size and np.issubdtype(a.dtype, np.number):
          final[k] = float(a[-1])
      if final:
        parts.append("final: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    except Exception:  # noqa: BLE001 - a repr never raises (e.g. on tracers)
      pass
    return f"InitResult({', '.join(parts)})"


def stack_history(rows: list[dict]) -> dict[str, np.ndarray]:
  """Per-step rows `[{key: value}, ...]` as `{key: array}` stacked along a step axis."""
  if not rows:
    return {}
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
