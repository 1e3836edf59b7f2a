"""Taking batches from an iterable, for the searches (`nio_jax.search`) and `nio_jax.measure`
(`nio_jax.cosine`): groups of batches per step (a list is cycled), the first batch without
losing it, and the optional progress bar.

Below both in the core's import graph: it imports only `nio_jax.checks`.
"""

from __future__ import annotations

import collections.abc
import itertools
from collections.abc import Iterable

from nio_jax import checks


def iterate_batches(batches: Iterable, num_steps: int, per_step: int = 1):
  """Yields `num_steps` groups of `per_step` batches.

  A re-iterable collection (list, tuple, or any `collections.abc.Collection`) is cycled, as
  the released code restarts its loader; a one-shot iterator must supply enough batches.
  """
  if isinstance(batches, dict) or hasattr(batches, "shape"):
    raise TypeError(
      "`batches` must be an iterable of batches (e.g. a list, or a generator), "
      "not a single batch; use [batch] or itertools.repeat(batch)."
    )
  checks.check_iterable("batches", batches)
  cyclic = isinstance(batches, collections.abc.Collection)
  if cyclic and len(batches) == 0:
    raise ValueError("`batches` is empty.")
  it = iter(batches)
  needed = num_steps * per_step
  for step in range(num_steps):
    group = []
    for _ in range(per_step):
      try:
        group.append(next(it))
      except StopIteration:
        if not cyclic:
          raise ValueError(
            f"`batches` ran out at step {step} of {num_steps} (needs {needed} batches, "
            f"{per_step} per step). Pass a list (it is cycled) or a longer iterator."
          ) from None
        it = iter(batches)
        group.append(next(it))
    yield group


def peek(batches: Iterable):
  """(first batch, an iterable that still yields every batch) without losing the first."""
  if isinstance(batches, dict) or hasattr(batches, "shape"):
    raise TypeError(
      "`batches` must be an iterable of batches (e.g. a list, or a generator), "
      "not a single batch; use [batch] or itertools.repeat(batch)."
    )
  checks.check_iterable("batches", batches)
  if isinstance(batches, collections.abc.Collection):
    if len(batches) == 0:
      raise ValueError("`batches` is empty.")
    return next(iter(batches)), batches
  it = iter(batches)
  try:
    first = next(it)
  except StopIteration:
    raise ValueError("`batches` is empty.") from None
  return first, itertools.chain([first], it)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
  """`iterable` wrapped in a tqdm bar of `total` steps when `enabled`, else unchanged."""
  if not enabled:
    return iterable
  from tqdm.auto import tqdm

  return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
