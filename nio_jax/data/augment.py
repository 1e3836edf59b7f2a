"""Host-side (numpy) batch transforms: augmentation + normalisation to float32 NHWC.

Every random choice comes from the `np.random.Generator` the loader passes for that batch,
which is seeded from `(seed, epoch, step)`; a batch is therefore the same whatever thread
made it and whether or not the run was resumed.

The CIFAR recipe of the GradInit / NIO scripts is
`RandomCrop(32, padding=4) -> RandomHorizontalFlip -> ToTensor -> Normalize -> Cutout(16)`:
cutout zeroes a 16x16 square (clipped at the borders; its centre is uniform over the image)
*after* normalisation, i.e. it sets those pixels to the dataset mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nio_jax.data.datasets import normalize


def random_crop_flip(
  images: np.ndarray, rng: np.random.Generator, padding: int = 4, flip: bool = True
) -> np.ndarray:
  """Random `H x W` crop of the zero-padded images plus a random horizontal flip, as one
  vectorised gather. `images`: `[B, H, W, C]` (any dtype)."""
  b, h, w, _ = images.shape
  if padding > 0:
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oy = rng.integers(0, 2 * padding + 1, size=b)
    ox = rng.integers(0, 2 * padding + 1, size=b)
  else:
    padded, oy, ox = images, np.zeros(b, np.int64), np.zeros(b, np.int64)
  cols = np.arange(w)
  if flip:
    do_flip = rng.random(b) < 0.5
    cols = np.where(do_flip[:, None], w - 1 - cols[None, :], cols[None, :])
  else:
    cols = np.broadcast_to(cols, (b, w))
  rows = oy[:, None] + np.arange(h)[None, :]
  cols = ox[:, None] + cols
  bi = np.arange(b)[:, None, None]
  return padded[bi, rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random horizontal flip of each image of a `[B, H, W, C]` batch (no crop)."""
  return random_crop_flip(images, rng, padding=0, flip=True)


def cutout(
  images: np.ndarray, rng: np.random.Generator, size: int = 16, value: float = 0.0
) -> np.ndarray:
  """DeVries & Taylor cutout, one hole per image, in place on a float batch; returns it."""
  b, h, w, _ = images.shape
  cy = rng.integers(0, h, size=b)
  cx = rng.integers(0, w, size=b)
  half = size // 2
  y = np.arange(h)[None, :]
  x = np.arange(w)[None, :]
  my = (y >= np.clip(cy - half, 0, h)[:, None]) & (y < np.clip(cy + half, 0, h)[:, None])
  mx = (x >= np.clip(cx - half, 0, w)[:, None]) & (x < np.clip(cx + half, 0, w)[:, None])
  mask = my[:, :, None] & mx[:, None, :]
  images[mask] = value
  return images


@dataclasses.dataclass(frozen=True)
class Transform:
  """uint8 NHWC batch -> normalised float32 NHWC batch, with optional augmentation.

  Attributes:
    mean, std: per-channel constants in [0, 1] units.
    crop_padding: random crop after zero padding by this many pixels (0: no crop).
    flip: random horizontal flip.
    cutout: side of the cutout square (0: none).
  """

  mean: Sequence[float]
  std: Sequence[float]
  crop_padding: int = 0
  flip: bool = False
  cutout: int = 0

  @property
  def random(self) -> bool:
    return bool(self.crop_padding or self.flip or self.cutout)

  def __call__(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    if self.random and rng is None:
      raise ValueError("a random transform needs an rng")
    if self.crop_padding or self.flip:
      images = random_crop_flip(images, rng, self.crop_padding, self.flip)
    out = normalize(images, self.mean, self.std)
    if self.cutout:
      out = cutout(out, rng, self.cutout)
    return out


def recipe_transform(
  name: str, train: bool, mean: Sequence[float], std: Sequence[float], augment: bool | None = None
) -> Transform:
  """The transform of the published recipes.

  CIFAR-10/100 (train): crop with 4-px padding, horizontal flip, cutout 16.
  ImageNet (train): horizontal flip (the random-resized crop happens in the source).
  Fashion-MNIST: none by default; `augment=True` gives crop (pad 4) + flip.
  Test splits: normalisation only. `augment=False` turns augmentation off everywhere.
  """
  if not train or augment is False:
    return Transform(mean, std)
  if name.startswith("cifar"):
    return Transform(mean, std, crop_padding=4, flip=True, cutout=16)
  if name.startswith("imagenet"):
    return Transform(mean, std, flip=True)
  if augment:
    return Transform(mean, std, crop_padding=4, flip=True)
  return Transform(mean, std)
