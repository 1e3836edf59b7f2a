"""Registry entry "fixup": delegates to `nio_jax.methods.fixup.fixup_init` (written with the
Fixup models). Fixup is an architecture plus its initialisation rule, applied when the model
is built (`variant="fixup"`), so this entry cannot turn a standard model into a Fixup one."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from nio_jax.methods.registry import register
from nio_jax.results import InitResult

PyTree = Any

_MISSING = (
  "Fixup is not a search over an existing model: build the model with "
  'variant="fixup" (e.g. nio_jax.models CIFAR ResNet, norm none), whose own init '
  'is the Fixup init, then use its params directly (method "kaiming" returns them '
  "unchanged)."
)


@register("fixup")
def fixup(
  loss_fn: Callable, params: PyTree, data: Any = None, config=None, *, progress: bool = False
) -> InitResult:
  """Fixup (Zhang et al., 2019); see `nio_jax.methods.fixup`."""
  try:
    mod = importlib.import_module("nio_jax.methods.fixup")
  except ModuleNotFoundError as e:
    if e.name != "nio_jax.methods.fixup":
      raise
    raise NotImplementedError(_MISSING) from None
  return mod.fixup_init(loss_fn, params, data, config, progress=progress)
