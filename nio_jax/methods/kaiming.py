"""The plain baseline: the model's own He (Kaiming) initialisation, unchanged.

Which He variant each model uses (fan-in or fan-out, normal or uniform, the PyTorch-default
layers) is documented per model in docs/models.md. The GradInit paper's "+1 epoch constant
LR" and "+1 epoch warmup" baselines also start from these params; their extra epoch lives
in the training schedule (`nio_jax.train`), not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from nio_jax import checks, method_config
from nio_jax.methods.registry import register
from nio_jax.results import InitResult

PyTree = Any


@dataclasses.dataclass(frozen=True)
class KaimingConfig:
  """No hyper-parameters: the params are taken as the model initialised them."""

  @classmethod
  def create(cls, config=None, **overrides) -> KaimingConfig:
    """From None, a KaimingConfig, or an empty dict / ConfigDict (any key is unknown)."""
    return cls(**method_config.config_values(cls, config, overrides, "Kaiming"))

  def to_dict(self) -> dict:
    """The (empty) plain dict of the fields."""
    return {}


@register("kaiming", config_cls=KaimingConfig, label="Kaiming")
def kaiming(
  loss_fn: Callable | None,
  params: PyTree,
  data: Any = None,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """Returns `params` unchanged (the model's He init), with no scales and an empty history.

  `loss_fn`, `data`, `progress` and `mesh` are accepted for the common interface and ignored.
  """
  del loss_fn, data, progress, mesh
  cfg = KaimingConfig.create(config)
  checks.check_params(params)
  return InitResult(params=params, scales=None, history={}, method="kaiming", config=cfg.to_dict())
