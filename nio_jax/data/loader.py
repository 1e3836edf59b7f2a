"""A deterministic, resumable, prefetching numpy batch loader.

Why not grain / tf.data?  grain would be an extra dependency (and tf.data a very large one);
for the datasets this project trains on (Fashion-MNIST, CIFAR: at most 60k small images, a
few hundred MB as uint8) a numpy pipeline is enough: a batch is one fancy-indexing gather
plus a vectorised crop/flip/cutout/normalise, a few milliseconds on one core, and numpy
releases the GIL in those kernels, so a single background thread keeps the accelerator fed
while the main thread dispatches jitted steps.  ImageNet through
`nio_jax.data.tfds_source.TFDSImageSource` works with the same loader but decodes in
Python per example; use a multi-process pipeline (grain) for full-speed ImageNet training.

Determinism and resumption
--------------------------
Everything random is a pure function of `(seed, stream, epoch, step)`:

* the epoch's order is `permutation(seed, stream, epoch)`;
* batch `step` of that epoch is the slice `[step*B, (step+1)*B)` of that order, and its
  augmentation draws from a generator seeded with `(seed, stream, epoch, step)`.

So `loader.epoch(e, start_step=s)` yields exactly the batches `s, s+1, ...` a run from
scratch would have seen in epoch `e`, whichever thread made them; a trainer only needs to
save `(epoch, step)` to resume bit-for-bit.  `stream` separates independent uses of the
same data (stream 0: training; stream 1: batches for an initialisation method).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np


class Source(Protocol):
  """Random-access data: `len(source)` and `source.read(indices, rng) -> (images, labels)`."""

  def __len__(self) -> int: ...

  def read(
    self, indices: np.ndarray, rng: np.random.Generator | None = None
  ) -> tuple[np.ndarray, np.ndarray]: ...


Batch = dict[str, np.ndarray]

_PERM_KEY = 0xFFFF  # spawn-key slot for the epoch permutation (steps use 0..)


class Loader:
  """Batches `{"image": float32 [B, H, W, C], "label": int32 [B]}` from a `Source`.

  Args:
    source: e.g. an `nio_jax.data.datasets.ArrayDataset`.
    batch_size: fixed batch size.
    seed: seed of shuffling and augmentation.
    shuffle: reshuffle every epoch (`False`: dataset order, e.g. for evaluation).
    drop_remainder: drop the last incomplete batch (training); otherwise it is yielded short.
    transform: `transform(uint8 images, rng) -> float32 images`
      (`nio_jax.data.augment.Transform`); default: divide by 255.
    prefetch: number of batches prepared ahead in a background thread (0: synchronous).
  """

  def __init__(
    self,
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    prefetch: int = 2,
  ):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(source)
    if drop_remainder and n < batch_size:
      raise ValueError(f"dataset of {n} examples is smaller than one batch ({batch_size})")
    self.source = source
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.transform = transform
    self.prefetch = int(prefetch)

  def __len__(self) -> int:
    return self.steps_per_epoch

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def steps_per_epoch(self) -> int:
    n, b = len(self.source), self.batch_size
    return n // b if self.drop_remainder else -(-n // b)

  def _seq(self, stream: int, epoch: int, slot: int) -> np.random.SeedSequence:
    if min(stream, epoch, slot) < 0:
      raise ValueError("stream, epoch and step must be non-negative")
    return np.random.SeedSequence(self.seed, spawn_key=(stream, epoch, slot))

  def permutation(self, epoch: int, stream: int = 0) -> np.ndarray:
    """The example order of `epoch`."""
    n = len(self.source)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng(self._seq(stream, epoch, _PERM_KEY)).permutation(n)

  def batch(
    self, epoch: int, step: int, stream: int = 0, *, _perm: np.ndarray | None = None
  ) -> Batch:
    """Batch `step` of `epoch` (a pure function of `(seed, stream, epoch, step)`)."""
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
    perm = self.permutation(epoch, stream) if _perm is None else _perm
    idx = perm[step * self.batch_size : (step + 1) * self.batch_size]
    rng = np.random.default_rng(self._seq(stream, epoch, step))
    images, labels = self.source.read(idx, rng)
    if self.transform is not None:
      images = self.transform(images, rng)
    else:
      images = np.asarray(images, np.float32) / np.float32(255.0)
    return {
      "image": np.ascontiguousarray(images, dtype=np.float32),
      "label": np.asarray(labels, np.int32),
    }

  def epoch(self, epoch: int, start_step: int = 0, stream: int = 0) -> Iterator[Batch]:
    """The batches `start_step, ..., steps_per_epoch - 1` of `epoch`, prefetched."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
    perm = self.permutation(epoch, stream)
    steps = range(start_step, self.steps_per_epoch)
    make = lambda s: self.batch(epoch, s, stream, _perm=perm)  # noqa: E731
    if self.prefetch <= 0:
      return (make(s) for s in steps)
    return _prefetch(make, steps, self.prefetch)

  def iterate(
    self, start_epoch: int = 0, start_step: int = 0, stream: int = 0
  ) -> Iterator[tuple[int, int, Batch]]:
    """Endless `(epoch, step, batch)` from position `(start_epoch, start_step)`."""
    e, s = start_epoch, start_step
    while True:
      for k, b in enumerate(self.epoch(e, s, stream)):
        yield e, s + k, b
      e, s = e + 1, 0

  def __iter__(self) -> Iterator[Batch]:
    """One epoch (epoch 0); use `epoch` / `iterate` to choose the position."""
    return self.epoch(0)

  def batches(self, num: int, stream: int = 1) -> BatchStream:
    """A sized, re-iterable stream of `num` batches from an independent `stream`
    (default 1, so an initialisation method does not consume the training order)."""
    return BatchStream(self, num, stream)


class BatchStream:
  """`num` consecutive batches of `loader.iterate(stream=stream)`; `len()`-able and
  re-iterable (each iteration yields the same batches)."""

  def __init__(self, loader: Loader, num: int, stream: int = 1):
    self.loader, self.num, self.stream = loader, int(num), int(stream)

  def __len__(self) -> int:
    return self.num

  def __iter__(self) -> Iterator[Batch]:
    it = self.loader.iterate(0, 0, self.stream)
    try:
      for _ in range(self.num):
        yield next(it)[2]
    finally:
      it.close()


_DONE = object()


def _prefetch(make: Callable[[int], Any], steps: range, depth: int) -> Iterator[Any]:
  """Run `make(step)` for `steps` in a daemon thread, `depth` items ahead.

  Exceptions in the worker re-raise in the consumer; closing (or dropping) the generator
  stops the worker.
  """
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for s in steps:
        if stop.is_set() or not put((True, make(s))):
          return
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
      put((False, e))
      return
    put((True, _DONE))

  def gen():
    # The worker starts on the first `next()`: an iterator that is never consumed
    # leaves no thread behind.
    t = threading.Thread(target=work, name="nio_jax-prefetch", daemon=True)
    t.start()
    try:
      while True:
        ok, item = q.get()
        if not ok:
          raise item
        if item is _DONE:
          return
        yield item
    finally:
      stop.set()
      t.join(timeout=5.0)

  return gen()
