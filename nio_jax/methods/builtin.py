"""Registry entries for methods implemented elsewhere: NIO (`nio_jax.nio`) and Fixup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nio_jax.methods.registry import register
from nio_jax.nio_search import NIOConfig
from nio_jax.nio_search import nio as _nio
from nio_jax.results import InitResult

PyTree = Any


@register("nio", config_cls=NIOConfig)
def nio(
  loss_fn: Callable, params: PyTree, batches, config=None, *, progress: bool = False, mesh=None
) -> InitResult:
  """NIO (GradCosine); see `nio_jax.nio_search.nio`. No config = the released ImageNet settings."""
  return _nio(loss_fn, params, batches, config, progress=progress, mesh=mesh)
