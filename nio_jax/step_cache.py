"""One cache of compiled steps, shared by the searches (NIO, GradInit, MetaInit), the GC
statistics and the trainer.

A compiled step is keyed on what it depends on: usually the loss function *object*, the
step-relevant part of the method's config, the shapes' spec and the mesh. Runs in one
process that agree on the key (the seeds of a sweep cell, the methods of `nio-jax compare`)
compile once. Keys that cannot be hashed (an unhashable model attribute or predicate) are
not cached: the step is built and returned, never stored.

    _STEPS = StepCache("nio", maxsize=32)
    step = _STEPS.get(key, lambda: jax.jit(functools.partial(_step, loss_fn, cfg)))
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any


class StepCache:
  """A bounded least-recently-used map from a hashable key to a built (compiled) step.

  Guarantees: `get(key, build)` calls `build()` at most once per live key; an unhashable key
  builds every time and stores nothing; at most `maxsize` steps are kept (the least recently
  used one is dropped first, which only costs a recompilation).
  """

  def __init__(self, name: str, maxsize: int = 32):
    """Args:
    name: what the cache holds (shown in `repr`, for debugging).
    maxsize: the number of steps kept (>= 1).
    """
    if int(maxsize) < 1:
      raise ValueError(f"StepCache {name!r}: maxsize must be >= 1, got {maxsize!r}")
    self.name = name
    self.maxsize = int(maxsize)
    self._steps: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

  def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
    """The step stored under `key`, built with `build()` (and stored) when missing."""
    try:
      hash(key)
    except TypeError:
      return build()
    if key in self._steps:
      self._steps.move_to_end(key)
      return self._steps[key]
    step = build()
    self._steps[key] = step
    while len(self._steps) > self.maxsize:
      self._steps.popitem(last=False)
    return step

  def __contains__(self, key) -> bool:
    try:
      return key in self._steps
    except TypeError:
      return False

  def __len__(self) -> int:
    return len(self._steps)

  def clear(self) -> None:
    """Drops every stored step (the next `get` of each key builds again)."""
    self._steps.clear()

  def __repr__(self) -> str:
    return f"StepCache({self.name!r}, {len(self)}/{self.maxsize} steps)"
