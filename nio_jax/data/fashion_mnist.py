"""Fashion-MNIST from the original gzipped IDX files.

The files are `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` as published by Zalando
Research (and installed by the Debian package `dataset-fashion-mnist`).
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

from nio_jax.data.datasets import ArrayDataset, pad_images

APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def default_data_dirs() -> list[pathlib.Path]:
  """Directories searched, in order: `$NIO_JAX_DATA` (and its `fashion_mnist` /
  `fashion-mnist` sub-directories), `/usr/share/datasets/fashion-mnist`,
  `~/.cache/nio_jax/fashion_mnist`."""
  dirs: list[pathlib.Path] = []
  env = os.environ.get("NIO_JAX_DATA")
  if env:
    base = pathlib.Path(env).expanduser()
    dirs += [base, base / "fashion_mnist", base / "fashion-mnist"]
  dirs += [
    pathlib.Path("/usr/share/datasets/fashion-mnist"),
    pathlib.Path("~/.cache/nio_jax/fashion_mnist").expanduser(),
  ]
  return dirs


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Read one (optionally gzipped) IDX file into a native-endian numpy array."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
  code, ndim = data[2], data[3]
  if code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
      f"{path}: payload has {len(data) - header} bytes, header {shape} needs {expected}"
    )
  arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return arr.astype(dtype.newbyteorder("="), copy=True)


def find_fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The first directory holding all four Fashion-MNIST files, else `FileNotFoundError`."""
  candidates = (
    [pathlib.Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs()
  )
  needed = [f for pair in _FILES.values() for f in pair]
  for d in candidates:
    if all((d / f).is_file() for f in needed):
      return d
  raise FileNotFoundError(
    "Fashion-MNIST IDX files ("
    + ", ".join(needed)
    + ") not found in "
    + ", ".join(str(d) for d in candidates)
    + f". Install them with `{APT_HINT}`, or download the four files from the dataset's "
    "public location into ~/.cache/nio_jax/fashion_mnist, or point $NIO_JAX_DATA at them."
  )


def load_fashion_mnist(
  split: str = "train", data_dir: str | os.PathLike | None = None, pad_to_32: bool = False
) -> ArrayDataset:
  """Fashion-MNIST `split` ("train": 60k, "test": 10k) as a uint8 NHWC `ArrayDataset`.

  Args:
    split: `"train"` or `"test"`.
    data_dir: directory with the four `*-ubyte.gz` files; default: search
      `default_data_dirs`.
    pad_to_32: zero-pad the 28x28 images to 32x32 (for CIFAR-shaped architectures).
  """
  if split not in _FILES:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  d = find_fashion_mnist_dir(data_dir)
  img_file, lbl_file = _FILES[split]
  images = read_idx(d / img_file)
  labels = read_idx(d / lbl_file)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(
      f"{d / img_file}: expected uint8 [N, 28, 28], got {images.dtype} {images.shape}"
    )
  if labels.shape != (images.shape[0],):
    raise ValueError(f"{d / lbl_file}: {labels.shape[0]} labels for {images.shape[0]} images")
  images = images[..., None]
  if pad_to_32:
    images = pad_images(images, 32)
  return ArrayDataset.named("fashion_mnist", split, images, labels.astype(np.int32), 10)
