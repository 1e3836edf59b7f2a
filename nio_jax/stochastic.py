"""Stochastic losses (dropout): a fresh PRNG key for every batch a search draws.

The core contract is `loss_fn(params, batch) -> [B]`, a pure function. A loss that needs
randomness (dropout, stochastic depth, any `nnx.Rngs` stream) opts in by carrying an
integer attribute `loss_fn.rng_seed`. Every search (`nio`, `gradinit`, `metainit`, `lsuv`,
`measure`) then hands it, instead of the user's batch, a `KeyedBatch(data, keys)`:

* `data` is the user's batch, unchanged (any pytree: a dict, a tuple `(x, y)`, ...);
* `keys` is a `uint32[B, 2]` array of raw PRNG keys, one per example: batch `n` drawn by the
  search (counted from 0, the input check included) uses
  `jax.random.split(fold_in(PRNGKey(rng_seed), n), B)`.

Because the keys are a batch leaf with the batch axis, every pullback slices them with the
examples: a per-example gradient (`vmap` over one-example batches) sees its own key, a
sub-batch sees its own slice. The Flax adapters (`nio_jax.flax_utils`) draw the model's
randomness from `keys[0]` of the batch they are given, so

* examples in one forward share one draw of the dropout mask generator (as in training,
  where one key serves the whole batch), and each per-example forward has its own;
* the key changes with every batch the search draws (a list of batches that is cycled
  gets new masks on every pass), and a run is reproducible from `rng_seed`.

Guarantees: the user's batch values are never changed; a loss without `rng_seed` receives
exactly the user's batches (nothing here runs); the keys depend only on `rng_seed` and the
batch's position in the stream, never on the data.
"""

from __future__ import annotations

import collections.abc
import itertools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any


class KeyedBatch(NamedTuple):
  """A user's batch (`data`) with one raw PRNG key per example (`keys`, `uint32[B, 2]`)."""

  data: PyTree
  keys: Any


def rng_seed(loss_fn: Callable) -> int | None:
  """The loss's `rng_seed` attribute (an int), or None for a deterministic loss.

  Raises:
    TypeError: the attribute is set but is not an int.
  """
  seed = getattr(loss_fn, "rng_seed", None)
  if seed is None:
    return None
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(
      f"loss_fn.rng_seed={seed!r} must be an int (the seed of the per-batch dropout keys) "
      "or None (a deterministic loss)."
    )
  return int(seed)


def _batch_size(data: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves or not np.shape(leaves[0]):
    raise ValueError(
      "a stochastic loss (loss_fn.rng_seed is set) needs batches whose leaves have a leading "
      "batch axis; got a batch without one."
    )
  return int(np.shape(leaves[0])[0])


def example_keys(seed: int, index: int, batch_size: int) -> np.ndarray:
  """The `uint32[batch_size, 2]` keys of batch number `index` of a search seeded `seed`."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), index)
  return np.asarray(jax.random.split(base, batch_size), np.uint32)


def attach(data: PyTree, seed: int, index: int) -> KeyedBatch:
  """`KeyedBatch(data, keys)` for batch number `index` (`example_keys`)."""
  if isinstance(data, KeyedBatch):
    return data
  return KeyedBatch(data, example_keys(seed, index, _batch_size(data)))


class _Keyed(collections.abc.Collection):
  """A re-iterable collection of batches, keyed on the fly; the counter runs on across
  passes, so a cycled list gets fresh keys on every pass."""

  def __init__(self, batches: collections.abc.Collection, seed: int):
    self._batches, self._seed, self._count = batches, seed, itertools.count()

  def __len__(self) -> int:
    return len(self._batches)

  def __contains__(self, x) -> bool:  # pragma: no cover - required by the ABC only
    return False

  def __iter__(self):
    for b in self._batches:
      yield attach(b, self._seed, next(self._count))


def keyed_batches(loss_fn: Callable, batches: Iterable) -> Iterable:
  """`batches` with per-example keys attached (`KeyedBatch`) when `loss_fn` is stochastic;
  `batches` itself (the same object) otherwise.

  A re-iterable collection stays re-iterable (the searches cycle lists); an iterator stays
  a one-shot iterator. Single batches and non-iterables are returned unchanged so that the
  searches' own input checks report them.
  """
  seed = rng_seed(loss_fn)
  if seed is None:
    return batches
  if isinstance(batches, (dict, KeyedBatch)) or hasattr(batches, "shape"):
    return batches
  if isinstance(batches, collections.abc.Collection):
    return _Keyed(batches, seed)
  if not isinstance(batches, collections.abc.Iterable):
    return batches
  count = itertools.count()
  return (attach(b, seed, next(count)) for b in batches)


def keyed_batch(loss_fn: Callable, batch: PyTree, index: int = 0) -> PyTree:
  """One batch keyed as batch number `index` when `loss_fn` is stochastic, else unchanged."""
  seed = rng_seed(loss_fn)
  return batch if seed is None else attach(batch, seed, index)


def split(batch: PyTree) -> tuple[PyTree, jax.Array | None]:
  """`(data, key)` of a batch a loss receives: the user's batch and the key its forward
  draws from (`keys[0]`), or `(batch, None)` for an unkeyed batch.

  For a loss written by hand: set `loss_fn.rng_seed = seed` and begin with
  `data, key = nio_jax.stochastic.split(batch)`.
  """
  if isinstance(batch, KeyedBatch):
    return batch.data, batch.keys[0]
  return batch, None
