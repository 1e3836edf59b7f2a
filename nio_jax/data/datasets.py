"""In-memory image datasets and per-dataset constants.

All in-memory datasets are held as `uint8` NHWC arrays (a quarter of the memory of float32)
and converted to normalised `float32` NHWC per batch, on the host, by the loader's
transform (see `nio_jax.data.augment`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Per-channel mean / std in [0, 1] units.  CIFAR values are those of the GradInit / NIO
# training scripts (torchvision `Normalize`), so that numbers are comparable.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  "fashion_mnist": ((0.2860,), (0.3530,)),
  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

NUM_CLASSES: dict[str, int] = {
  "fashion_mnist": 10,
  "cifar10": 10,
  "cifar100": 100,
  "imagenet2012": 1000,
}


@dataclasses.dataclass
class ArrayDataset:
  """An in-memory labelled image dataset.

  Attributes:
    images: `uint8` array `[N, H, W, C]`.
    labels: `int32` array `[N]`.
    num_classes: number of classes.
    mean, std: per-channel normalisation constants in [0, 1] units (length `C`).
    name: dataset name, e.g. `"cifar10"`.
    split: `"train"` or `"test"`.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str = ""
  split: str = ""

  def __post_init__(self):
    if self.images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {self.images.shape}")
    if self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got {self.images.dtype}")
    self.labels = np.asarray(self.labels, dtype=np.int32)
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
        f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images"
      )
    c = self.images.shape[-1]
    if len(self.mean) != c or len(self.std) != c:
      raise ValueError(f"mean/std need {c} channels, got {self.mean} / {self.std}")

  @classmethod
  def named(
    cls,
    name: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int | None = None,
  ) -> ArrayDataset:
    """A dataset with the registered normalisation of `name` (`DATASET_STATS`).

    Args:
      name: dataset name; one not in `DATASET_STATS` gets mean = std = 0.5 per channel.
      split: `"train"` or `"test"`.
      images: `uint8 [N, H, W, C]`.
      labels: `[N]` integer labels.
      num_classes: None = `NUM_CLASSES[name]`, or `max(labels) + 1` for an unregistered
        name.

    Returns:
      The checked `ArrayDataset`.
    """
    c = images.shape[-1]
    mean, std = DATASET_STATS.get(name, ((0.5,) * c, (0.5,) * c))
    if num_classes is None:
      num_classes = NUM_CLASSES.get(name, int(labels.max()) + 1)
    return cls(
      images=images,
      labels=labels,
      num_classes=num_classes,
      mean=mean,
      std=std,
      name=name,
      split=split,
    )

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])  # type: ignore[return-value]

  def read(
    self, indices: np.ndarray, rng: np.random.Generator | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Random access used by `nio_jax.data.loader.Loader`: `(uint8 images, labels)`.
    `rng` is unused here (sources that decode/crop per example use it)."""
    return self.images[indices], self.labels[indices]

  def subset(self, indices: int | Sequence[int] | np.ndarray) -> ArrayDataset:
    """The first `n` examples (int) or the given indices."""
    if isinstance(indices, (int, np.integer)):
      indices = np.arange(int(indices))
    idx = np.asarray(indices)
    return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

  def normalized(self) -> np.ndarray:
    """All images as normalised `float32` NHWC (no augmentation)."""
    return normalize(self.images, self.mean, self.std)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """`uint8` (or [0, 255] float) NHWC -> `float32` `(x / 255 - mean) / std`."""
  mean_ = np.asarray(mean, np.float32) * np.float32(255.0)
  inv = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
  out = images.astype(np.float32)
  out -= mean_
  out *= inv
  return out


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pad NHWC images symmetrically to `size` x `size` (e.g. 28 -> 32)."""
  h, w = images.shape[1:3]
  if h > size or w > size:
    raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))
