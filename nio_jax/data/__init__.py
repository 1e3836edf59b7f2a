"""Data: Fashion-MNIST (IDX), CIFAR-10/100 (python pickles or TFDS), ImageNet (TFDS), host-side
augmentation and a deterministic, resumable, prefetching loader.

Quick start::

    from nio_jax import data
    train_loader, test_set = data.make_loaders("cifar10", batch_size=128, seed=0)
    for batch in train_loader.epoch(0):   # {"image": f32 [128,32,32,3], "label": i32 [128]}
        ...
"""

from __future__ import annotations

import os

from nio_jax.data.augment import Transform, cutout, random_crop_flip, recipe_transform
from nio_jax.data.cifar import RestrictedUnpickler, UnsafePickleError, load_cifar, restricted_load
from nio_jax.data.datasets import DATASET_STATS, NUM_CLASSES, ArrayDataset, normalize, pad_images
from nio_jax.data.fashion_mnist import find_fashion_mnist_dir, load_fashion_mnist, read_idx
from nio_jax.data.loader import BatchStream, Loader
from nio_jax.data.tfds_source import TFDSImageSource, load_tfds_arrays

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012")

__all__ = [
  "ArrayDataset",
  "BatchStream",
  "DATASETS",
  "DATASET_STATS",
  "Loader",
  "NUM_CLASSES",
  "RestrictedUnpickler",
  "TFDSImageSource",
  "Transform",
  "UnsafePickleError",
  "cutout",
  "find_fashion_mnist_dir",
  "load_cifar",
  "load_dataset",
  "load_fashion_mnist",
  "load_tfds_arrays",
  "make_loaders",
  "normalize",
  "pad_images",
  "random_crop_flip",
  "read_idx",
  "recipe_transform",
  "restricted_load",
]


def load_dataset(
  name: str,
  split: str = "train",
  *,
  data_dir: str | os.PathLike | None = None,
  source: str = "auto",
  pad_to_32: bool = False,
  image_size: int = 224,
):
  """Load `name` / `split` ("train" or "test").

  Args:
    name: one of `DATASETS`.
    source: `"files"` (IDX for Fashion-MNIST, python pickles for CIFAR), `"tfds"`, or
      `"auto"` (files if found, else TFDS). ImageNet always uses TFDS.
    pad_to_32: Fashion-MNIST only: zero-pad 28x28 to 32x32.
    image_size: ImageNet only.

  Returns an `ArrayDataset` (in memory), or a `TFDSImageSource` for ImageNet.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
  if source not in ("auto", "files", "tfds"):
    raise ValueError(f"source must be 'auto', 'files' or 'tfds', got {source!r}")
  if name == "imagenet2012":
    return TFDSImageSource(name, split, data_dir=data_dir, image_size=image_size)
  if source in ("auto", "files"):
    try:
      if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir, pad_to_32=pad_to_32)
      return load_cifar(name, split, data_dir)
    except FileNotFoundError as file_error:
      if source == "files":
        raise
      try:
        import tensorflow_datasets  # noqa: F401, PLC0415
      except ImportError:
        # The file error names the install command; more useful than TFDS's.
        raise file_error from None
  return load_tfds_arrays(name, split, data_dir=data_dir, pad_to_32=pad_to_32)


def make_loaders(
  name: str,
  batch_size: int,
  *,
  seed: int = 0,
  data_dir=None,
  source: str = "auto",
  pad_to_32: bool = False,
  augment: bool | None = None,
  prefetch: int = 2,
  train_subset: int | None = None,
  test_subset: int | None = None,
):
  """`(train_loader, test_set)` with the recipe augmentation on the training loader.

  `test_set` is the test split as a source (in-memory for all but ImageNet); the trainer
  evaluates it in fixed-size padded batches. `*_subset` keep the first n examples.
  """
  train = load_dataset(name, "train", data_dir=data_dir, source=source, pad_to_32=pad_to_32)
  test = load_dataset(name, "test", data_dir=data_dir, source=source, pad_to_32=pad_to_32)
  if train_subset is not None:
    train = train.subset(train_subset)
  if test_subset is not None:
    test = test.subset(test_subset)
  tf = recipe_transform(name, True, train.mean, train.std, augment)
  loader = Loader(
    train, batch_size, seed=seed, shuffle=True, drop_remainder=True, transform=tf, prefetch=prefetch
  )
  return loader, test
