"""CIFAR-10 / CIFAR-100 from the official python pickles, read with a restricted unpickler.

`cifar-10-batches-py/{data_batch_1..5,test_batch}` and `cifar-100-python/{train,test}`
are pickled dicts `{b'data': uint8 [N, 3072], b'labels' | b'fine_labels': [int], ...}`
(rows are 1024 red, 1024 green, 1024 blue values, row-major 32x32).

`pickle.load` on an untrusted file runs arbitrary code, so `RestrictedUnpickler`
resolves only the handful of numpy names needed to rebuild plain numeric arrays and refuses
every other global with `UnsafePickleError`.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

import numpy as np

from nio_jax.data.datasets import ArrayDataset


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the allow-list of `RestrictedUnpickler`."""


# dtypes the data files may legitimately hold (no object / void / datetime kinds).
_SAFE_DTYPE_KINDS = frozenset("biuf")


def _checked_dtype(obj) -> np.dtype:
  dt = np.dtype(obj)
  if dt.kind not in _SAFE_DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None:
    raise UnsafePickleError(f"refusing numpy dtype {dt!r} (only plain numeric dtypes allowed)")
  return dt


def _safe_dtype(name, align=False, copy=False):
  # `numpy.dtype` as called by pickle: dtype('u1', False, True), then __setstate__.
  _checked_dtype(name)
  return np.dtype(name, align, copy)


def _safe_reconstruct(cls, shape, dtype):
  # `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` then ndarray.__setstate__.
  if cls is not np.ndarray:
    raise UnsafePickleError(f"refusing to reconstruct {cls!r} (only numpy.ndarray)")
  return np.ndarray.__new__(np.ndarray, shape, np.dtype("b"))


def _safe_frombuffer(buf, dtype, shape, order):
  # numpy>=1.16 pickles with protocol 5 as `numpy._core.numeric._frombuffer`.
  dt = _checked_dtype(dtype)
  return np.frombuffer(buf, dtype=dt).reshape(shape, order=order).copy()


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
  # Python 3 writes `bytes` under protocol <= 2 as _codecs.encode(str, 'latin1').
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
  return obj.encode("latin1", errors)


_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _ALLOWED[(_mod, "_reconstruct")] = _safe_reconstruct
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
  _ALLOWED[(_mod, "_frombuffer")] = _safe_frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = _safe_dtype
_ALLOWED[("_codecs", "encode")] = _safe_codecs_encode


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only the numpy array-reconstruction names in `_ALLOWED`.

  Anything else (`os.system`, `builtins.eval`, `subprocess.Popen`, arbitrary classes)
  raises `UnsafePickleError` before it can be called.
  """

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
        f"refusing to load global {module}.{name!s} from a data pickle: only numpy "
        "array reconstruction is allowed (is this really a CIFAR file?)"
      ) from None


def restricted_load(file, *, encoding: str = "bytes") -> Any:
  """`pickle.load` through `RestrictedUnpickler`, then checks the result holds only
  dicts, lists, tuples, bytes, str, numbers and plain numeric numpy arrays."""
  if isinstance(file, (bytes, bytearray)):
    file = io.BytesIO(file)
  obj = RestrictedUnpickler(file, encoding=encoding).load()
  _validate(obj)
  return obj


def _validate(obj, depth: int = 0) -> None:
  if depth > 10:
    raise UnsafePickleError("pickle nesting deeper than expected for a data file")
  if isinstance(obj, dict):
    for k, v in obj.items():
      _validate(k, depth + 1)
      _validate(v, depth + 1)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      if not isinstance(v, (int, float, bytes, str)):
        _validate(v, depth + 1)
  elif isinstance(obj, np.ndarray):
    _checked_dtype(obj.dtype)
  elif obj is None or isinstance(obj, (bytes, str, int, float, bool, np.generic)):
    pass
  else:
    raise UnsafePickleError(f"unexpected object of type {type(obj).__name__} in data pickle")


_LAYOUT = {
  "cifar10": (
    "cifar-10-batches-py",
    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    b"labels",
    10,
  ),
  "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels", 100),
}


def default_cifar_dirs(name: str) -> list[pathlib.Path]:
  """The folders searched for the extracted CIFAR archive `name` ("cifar10"/"cifar100"), in
  order: under `$NIO_JAX_DATA`, `~/.cache/nio_jax/<name>`, `/usr/share/datasets/<name>`."""
  sub = _LAYOUT[name][0]
  dirs = []
  env = os.environ.get("NIO_JAX_DATA")
  if env:
    dirs += [pathlib.Path(env).expanduser() / sub, pathlib.Path(env).expanduser() / name / sub]
  dirs += [
    pathlib.Path("~/.cache/nio_jax").expanduser() / name / sub,
    pathlib.Path("/usr/share/datasets") / name / sub,
  ]
  return dirs


def _read_batch(path: pathlib.Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f:
    d = restricted_load(f)
  if not isinstance(d, dict) or b"data" not in d or label_key not in d:
    keys = list(d) if isinstance(d, dict) else type(d).__name__
    raise ValueError(f"{path}: expected a dict with b'data' and {label_key!r}, got {keys}")
  data = np.asarray(d[b"data"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
  labels = np.asarray(d[label_key], dtype=np.int64)
  if labels.shape != (data.shape[0],):
    raise ValueError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar(
  name: str = "cifar10", split: str = "train", data_dir: str | os.PathLike | None = None
) -> ArrayDataset:
  """CIFAR-10 / CIFAR-100 `split` from the python pickles as a uint8 NHWC `ArrayDataset`.

  Args:
    name: `"cifar10"` or `"cifar100"` (fine labels).
    split: `"train"` or `"test"`.
    data_dir: the `cifar-10-batches-py` / `cifar-100-python` directory itself or its parent.
      Default: `$NIO_JAX_DATA/<dir>`, `~/.cache/nio_jax/<name>/<dir>`,
      `/usr/share/datasets/<name>/<dir>`.
  """
  if name not in _LAYOUT:
    raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
  sub, files, label_key, num_classes = _LAYOUT[name]
  if split not in files:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if data_dir is not None:
    d = pathlib.Path(data_dir).expanduser()
    candidates = [d, d / sub]
  else:
    candidates = default_cifar_dirs(name)
  for d in candidates:
    if all((d / f).is_file() for f in files[split]):
      break
  else:
    raise FileNotFoundError(
      f"{name} pickles ({sub}/{', '.join(files[split])}) not found in "
      + ", ".join(str(c) for c in candidates)
      + f". Extract the official python archive there, or use the TFDS path "
      f"(load_dataset('{name}', source='tfds'))."
    )
  parts = [_read_batch(d / f, label_key) for f in files[split]]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
    raise ValueError(f"{d}: labels outside [0, {num_classes})")
  return ArrayDataset.named(name, split, images, labels, num_classes)
