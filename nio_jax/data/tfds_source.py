"""Datasets through TensorFlow Datasets (imported lazily: `pip install tensorflow-datasets`).

* Small datasets (`cifar10`, `cifar100`, `fashion_mnist`) are read fully into memory as
  an `nio_jax.data.datasets.ArrayDataset`, preferably through `tfds.data_source`
  (random access over `array_record` files, no TensorFlow needed), falling back to
  `tfds.as_numpy(tfds.load(..., batch_size=-1))` (needs TensorFlow) for datasets prepared
  in the older `tfrecord` format.
* ImageNet (`imagenet2012`) is far too large for memory: `TFDSImageSource` wraps
  `tfds.data_source` for random access and decodes/crops/resizes per example on the host
  (PIL), which the `nio_jax.data.loader.Loader` runs in its prefetch thread.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from nio_jax.data.datasets import DATASET_STATS, NUM_CLASSES, ArrayDataset


def _tfds():
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415  (lazy by design)
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "the TFDS data path needs tensorflow-datasets: `pip install 'nio_jax[tfds]'` "
      "(or `pip install tensorflow-datasets`); the datasets themselves are prepared with "
      "`tfds build <name>` or downloaded on first use"
    ) from e
  return tfds


_SPLITS = {"train": "train", "test": "test", "validation": "validation"}
_TFDS_TEST_SPLIT = {"imagenet2012": "validation"}


def _tfds_split(name: str, split: str) -> str:
  if split == "test":
    return _TFDS_TEST_SPLIT.get(name, "test")
  return split


def _label_of(record: dict) -> int:
  return int(record["label"])


def load_tfds_arrays(
  name: str,
  split: str = "train",
  data_dir: str | os.PathLike | None = None,
  download: bool = False,
  pad_to_32: bool = False,
) -> ArrayDataset:
  """A small TFDS image-classification dataset fully in memory (uint8 NHWC).

  `cifar100` uses the fine labels (TFDS `label`). `download=False` by default: this
  machine has no access to the dataset hosts; prepare the data beforehand.
  """
  tfds = _tfds()
  tsplit = _tfds_split(name, split)
  images = labels = None
  try:
    src = tfds.data_source(name, split=tsplit, data_dir=data_dir, download=download)
    n = len(src)
    try:  # one batched read where the source has it
      recs = src.__getitems__(range(n))
    except (AttributeError, TypeError):  # no batched read (tfds.testing.mock_data's takes no self)
      recs = [src[i] for i in range(n)]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in recs])
    labels = np.asarray([_label_of(r) for r in recs], np.int32)
  except Exception as first_error:  # array_record not available: try tf.data
    try:
      ds = tfds.load(
        name, split=tsplit, data_dir=data_dir, download=download, batch_size=-1, as_supervised=True
      )
      images, labels = tfds.as_numpy(ds)
      images = np.asarray(images, np.uint8)
      labels = np.asarray(labels, np.int32)
    except Exception as e:
      raise RuntimeError(
        f"could not read TFDS {name}/{tsplit} via data_source ({first_error!r}) "
        f"nor via tfds.load ({e!r})"
      ) from e
  if images.ndim == 3:
    images = images[..., None]
  if pad_to_32:
    from nio_jax.data.datasets import pad_images  # noqa: PLC0415

    images = pad_images(images, 32)
  return ArrayDataset.named(name, split, images, labels)


class TFDSImageSource:
  """Random-access ImageNet-style source over `tfds.data_source` with host-side decoding.

  `read(indices)` returns `(uint8 [B, S, S, 3], int32 [B])`: training examples get an
  Inception-style random-resized crop (scale 0.08-1, ratio 3/4-4/3) at `image_size`; eval
  examples are resized to `image_size / 0.875` on the short side and centre-cropped.
  Flip and normalisation are left to the loader's transform, like for in-memory data.
  The crop randomness comes from the `rng` the loader passes (deterministic per batch).
  """

  def __init__(
    self,
    name: str = "imagenet2012",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    download: bool = False,
  ):
    tfds = _tfds()
    self.name, self.split, self.image_size = name, split, image_size
    self.train = split == "train"
    self._src = tfds.data_source(
      name, split=_tfds_split(name, split), data_dir=data_dir, download=download
    )
    self.num_classes = NUM_CLASSES.get(name, 1000)
    self.mean, self.std = DATASET_STATS.get(name, DATASET_STATS["imagenet2012"])

  def __len__(self) -> int:
    return len(self._src)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def read(self, indices: np.ndarray, rng: np.random.Generator | None = None):
    recs = [self._src[int(i)] for i in indices]
    rng = rng if rng is not None else np.random.default_rng(0)
    out = np.empty((len(recs), self.image_size, self.image_size, 3), np.uint8)
    for k, r in enumerate(recs):
      img = _decode(r["image"])
      out[k] = (
        _random_resized_crop(img, self.image_size, rng)
        if self.train
        else _center_crop(img, self.image_size)
      )
    return out, np.asarray([_label_of(r) for r in recs], np.int32)


def _decode(image: Any) -> np.ndarray:
  if isinstance(image, (bytes, bytearray)):
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image  # noqa: PLC0415

  return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  h, w = img.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return _resize(img[y : y + ch, x : x + cw], size, size)
  return _center_crop(img, size)


def _center_crop(img: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  h, w = img.shape[:2]
  short = size / crop_fraction
  nh, nw = (
    (int(round(short * h / w)), int(round(short)))
    if w < h
    else (int(round(short)), int(round(short * w / h)))
  )
  img = _resize(img, max(nh, size), max(nw, size))
  h, w = img.shape[:2]
  y, x = (h - size) // 2, (w - size) // 2
  return img[y : y + size, x : x + size]
