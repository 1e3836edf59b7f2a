"""Test data for the trainer's evaluations: fixed-size batches, the last one padded and
masked, so that one compiled evaluation step serves every batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from nio_jax.data.augment import Transform
from nio_jax.data.loader import Loader


@dataclasses.dataclass(frozen=True)
class EvalData:
  """Test data as the trainer evaluates it.

  Attributes:
    batches: `batches()` yields `{"image", "label", "mask"}` batches of one size; `mask` is
      1 for real examples and 0 for the padding of the last batch.
    num_examples: the number of real examples.
  """

  batches: Callable[[], Iterator[dict]]
  num_examples: int


def as_eval_data(test_data, batch_size: int) -> EvalData:
  """`EvalData` of a Loader, a source with `mean` / `std` (ArrayDataset, TFDSImageSource) or
  `{"image": float32, "label": int}` arrays.

  A Loader keeps its own batch size; the others are batched by `batch_size` (a source by
  at most its length), unshuffled.
  """
  if isinstance(test_data, dict):
    images = np.asarray(test_data["image"], np.float32)
    labels = np.asarray(test_data["label"], np.int32)
    n = len(labels)

    def gen():
      for i in range(0, n, batch_size):
        yield {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
  else:
    if isinstance(test_data, Loader):
      loader = test_data
    else:
      loader = Loader(
        test_data,
        min(batch_size, len(test_data)),
        shuffle=False,
        drop_remainder=False,
        transform=Transform(test_data.mean, test_data.std),
      )
    n, batch_size = loader.num_examples, loader.batch_size

    def gen():
      return loader.epoch(0)

  def padded():
    for b in gen():
      k = len(b["label"])
      mask = np.zeros(batch_size, np.float32)
      mask[:k] = 1.0
      if k < batch_size:
        pad = batch_size - k
        b = {
          "image": np.concatenate(
            [b["image"], np.zeros((pad,) + b["image"].shape[1:], np.float32)]
          ),
          "label": np.concatenate([b["label"], np.zeros(pad, np.int32)]),
        }
      yield {**b, "mask": mask}

  return EvalData(padded, n)
