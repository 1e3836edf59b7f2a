"""Tests of nio_jax.data on tiny fake files in the real formats (and real Fashion-MNIST when
installed)."""

import gzip
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest

from nio_jax import data
from nio_jax.data import augment, cifar, fashion_mnist


# ----------------------------------------------------------------------------- helpers
def write_idx(path: pathlib.Path, arr: np.ndarray) -> None:
  arr = np.asarray(arr, np.uint8)
  header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + arr.tobytes())


def make_fake_fmnist(d: pathlib.Path, n_train=12, n_test=7, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
    write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
    out[split] = (x, y)
  return out


def cifar_record(
  images_hwc: np.ndarray, labels, label_key=b"labels", py2_names=True, protocol=2
) -> bytes:
  """A pickle in the official layout: rows are 1024 R, 1024 G, 1024 B values."""
  flat = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)
  d = {
    b"batch_label": b"fake batch",
    label_key: list(map(int, labels)),
    b"data": flat,
    b"filenames": [b"img%d.png" % i for i in range(len(labels))],
  }
  if label_key == b"fine_labels":
    d[b"coarse_labels"] = [int(v) // 5 for v in labels]
  raw = pickle.dumps(d, protocol=protocol)
  if py2_names and protocol <= 3:  # real files were written by numpy 1.x: numpy.core.*
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  return raw


# ----------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_idx_roundtrip_and_pad(tmp_path):
  ref = make_fake_fmnist(tmp_path)
  tr = data.load_fashion_mnist("train", tmp_path)
  te = data.load_fashion_mnist("test", tmp_path, pad_to_32=True)
  assert tr.images.shape == (12, 28, 28, 1) and tr.images.dtype == np.uint8
  np.testing.assert_array_equal(tr.images[..., 0], ref["train"][0])
  np.testing.assert_array_equal(tr.labels, ref["train"][1])
  assert tr.labels.dtype == np.int32 and tr.num_classes == 10
  assert te.images.shape == (7, 32, 32, 1)
  np.testing.assert_array_equal(te.images[:, 2:30, 2:30, 0], ref["test"][0])
  assert te.images[:, :2].max() == 0 and te.images[:, 30:].max() == 0
  x = tr.normalized()
  assert x.dtype == np.float32 and x.shape == (12, 28, 28, 1)
  np.testing.assert_allclose(x, (ref["train"][0][..., None] / 255.0 - 0.2860) / 0.3530, rtol=1e-5)


def test_fashion_mnist_env_dir_and_missing_error(tmp_path, monkeypatch):
  (tmp_path / "fashion_mnist").mkdir()
  make_fake_fmnist(tmp_path / "fashion_mnist")
  monkeypatch.setenv("NIO_JAX_DATA", str(tmp_path))
  assert len(data.load_fashion_mnist("test")) == 7  # $NIO_JAX_DATA comes first
  assert fashion_mnist.default_data_dirs()[0] == tmp_path
  assert data.find_fashion_mnist_dir() == tmp_path / "fashion_mnist"
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    data.load_fashion_mnist("train", tmp_path / "nowhere")


def test_read_idx_rejects_bad_files(tmp_path):
  p = tmp_path / "bad.gz"
  with gzip.open(p, "wb") as f:
    f.write(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
  with pytest.raises(ValueError, match="magic"):
    data.read_idx(p)
  with gzip.open(p, "wb") as f:
    f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
  with pytest.raises(ValueError, match="payload"):
    data.read_idx(p)


REAL_FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not REAL_FMNIST.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
  ds = data.load_fashion_mnist("test", REAL_FMNIST.parent)
  assert ds.images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- CIFAR pickles
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickles_real_layout(tmp_path, protocol):
  d = tmp_path / "cifar-10-batches-py"
  d.mkdir()
  rng = np.random.default_rng(1)
  parts = []
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 3)
    (d / name).write_bytes(cifar_record(x, y, protocol=protocol))
    parts.append((x, y))
  tr = data.load_cifar("cifar10", "train", tmp_path)  # parent directory works too
  te = data.load_cifar("cifar10", "test", d)
  assert tr.images.shape == (15, 32, 32, 3) and te.images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(tr.images, np.concatenate([p[0] for p in parts[:5]]))
  np.testing.assert_array_equal(tr.labels, np.concatenate([p[1] for p in parts[:5]]))
  np.testing.assert_array_equal(te.images, parts[5][0])
  assert tr.mean == data.DATASET_STATS["cifar10"][0]


def test_cifar100_fine_labels(tmp_path):
  d = tmp_path / "cifar-100-python"
  d.mkdir()
  x = np.arange(2 * 32 * 32 * 3, dtype=np.uint32).reshape(2, 32, 32, 3).astype(np.uint8)
  (d / "train").write_bytes(cifar_record(x, [42, 99], b"fine_labels"))
  (d / "test").write_bytes(cifar_record(x[:1], [7], b"fine_labels"))
  ds = data.load_cifar("cifar100", "train", d)
  assert ds.labels.tolist() == [42, 99] and ds.num_classes == 100
  np.testing.assert_array_equal(ds.images, x)


def test_cifar_missing_names_tfds_alternative(tmp_path):
  with pytest.raises(FileNotFoundError, match="source='tfds'"):
    data.load_cifar("cifar10", "train", tmp_path)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalCall:
  def __reduce__(self):
    return (eval, ("1+1",))


def test_restricted_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=2)
  with pytest.raises(data.UnsafePickleError, match="system"):
    data.restricted_load(payload)
  assert not marker.exists()
  with pytest.raises(data.UnsafePickleError, match="eval"):
    data.restricted_load(pickle.dumps(_EvalCall()))
  # the same payload as a CIFAR batch file: refused by load_cifar as well
  d = tmp_path / "cifar-10-batches-py"
  d.mkdir()
  (d / "test_batch").write_bytes(payload)
  with pytest.raises(data.UnsafePickleError):
    data.load_cifar("cifar10", "test", d)
  assert not marker.exists()
  # sanity: plain pickle would have run it
  assert isinstance(cifar.RestrictedUnpickler, type) and issubclass(
    cifar.RestrictedUnpickler, pickle.Unpickler
  )


def test_restricted_unpickler_refuses_object_arrays():
  obj = np.array([1, "a", None], dtype=object)
  for protocol in (2, 5):
    with pytest.raises(data.UnsafePickleError):
      data.restricted_load(pickle.dumps({b"data": obj}, protocol=protocol))


# ----------------------------------------------------------------------------- augmentation
def test_crop_flip_cutout_semantics():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(augment.random_crop_flip(x, rng, padding=0, flip=False), x)
  y = augment.random_crop_flip(x, np.random.default_rng(5), padding=0, flip=True)
  for a, b in zip(x, y):
    assert np.array_equal(a, b) or np.array_equal(a[:, ::-1], b)
  c = augment.random_crop_flip(x, np.random.default_rng(5), padding=4, flip=True)
  assert c.shape == x.shape and c.dtype == np.uint8
  # every crop is a window of the zero-padded (maybe flipped) image
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(6):
    ok = any(
      np.array_equal(c[i], img[oy : oy + 8, ox : ox + 8])
      for img in (padded[i], padded[i][:, ::-1])
      for oy in range(9)
      for ox in range(9)
    )
    assert ok
  f = np.ones((50, 32, 32, 3), np.float32)
  augment.cutout(f, np.random.default_rng(1), 16)
  zeros = (f == 0).all(-1).sum((1, 2))
  assert zeros.max() == 256 and zeros.min() >= 64  # centre in a corner keeps a quarter
  tf = data.recipe_transform("cifar10", True, (0.5,) * 3, (0.25,) * 3)
  assert (tf.crop_padding, tf.flip, tf.cutout) == (4, True, 16)
  assert not data.recipe_transform("fashion_mnist", True, (0.5,), (0.25,)).random
  assert not data.recipe_transform("cifar10", False, (0.5,) * 3, (0.25,) * 3).random


# ----------------------------------------------------------------------------- loader
def fake_dataset(n=50, hw=8, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return data.ArrayDataset(
    rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8),
    np.arange(n) % 10,
    10,
    (0.5,) * c,
    (0.25,) * c,
    "fake",
    "train",
  )


def make_loader(ds, **kw):
  tf = data.Transform(ds.mean, ds.std, crop_padding=2, flip=True, cutout=4)
  return data.Loader(ds, kw.pop("batch_size", 8), transform=tf, **kw)


def batches_equal(a, b):
  return len(a) == len(b) and all(
    np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    for x, y in zip(a, b)
  )


def test_loader_shapes_and_epoch_coverage():
  ds = fake_dataset()
  ld = make_loader(ds, seed=3)
  assert ld.steps_per_epoch == 6 and len(ld) == 6
  bs = list(ld.epoch(0))
  assert len(bs) == 6
  assert all(
    b["image"].shape == (8, 8, 8, 3)
    and b["image"].dtype == np.float32
    and b["label"].dtype == np.int32
    for b in bs
  )
  perm = ld.permutation(0)
  assert sorted(perm.tolist()) == list(range(50))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in bs]), ds.labels[perm[:48]])
  ev = data.Loader(
    ds, 8, shuffle=False, drop_remainder=False, transform=data.Transform(ds.mean, ds.std)
  )
  sizes = [len(b["label"]) for b in ev.epoch(0)]
  assert sizes == [8] * 6 + [2] and ev.steps_per_epoch == 7


def test_loader_determinism_and_resume():
  ds = fake_dataset()
  a, b = make_loader(ds, seed=7), make_loader(ds, seed=7, prefetch=0)
  e1a = list(a.epoch(1))
  assert batches_equal(e1a, list(b.epoch(1)))  # prefetch or not: same batches
  assert batches_equal(e1a[4:], list(a.epoch(1, start_step=4)))  # resume mid-epoch
  assert batches_equal(e1a[2:3], [a.batch(1, 2)])
  assert not np.array_equal(a.permutation(0), a.permutation(1))  # reshuffled per epoch
  assert not np.array_equal(a.permutation(0), make_loader(ds, seed=8).permutation(0))
  # the augmentation is random but reproducible
  assert not np.array_equal(a.batch(0, 0)["image"], a.batch(1, 0)["image"])
  it = a.iterate(start_epoch=0, start_step=5)
  pos = [next(it)[:2] for _ in range(3)]
  it.close()
  assert pos == [(0, 5), (1, 0), (1, 1)]
  # an independent stream for init batches; sized and re-iterable
  stream = a.batches(9, stream=1)
  s1, s2 = list(stream), list(stream)
  assert len(stream) == 9 and batches_equal(s1, s2)
  assert not np.array_equal(s1[0]["label"], e1a[0]["label"]) or not np.array_equal(
    a.permutation(0, 1), a.permutation(0, 0)
  )


def test_loader_worker_error_propagates_and_early_close():
  class Broken:
    def __len__(self):
      return 16

    def read(self, idx, rng=None):
      raise RuntimeError("disk on fire")

  with pytest.raises(RuntimeError, match="disk on fire"):
    next(iter(data.Loader(Broken(), 4)))
  ld = make_loader(fake_dataset(), seed=0)
  it = ld.epoch(0)
  next(it)
  it.close()  # stops the worker without hanging


def test_make_loaders_fashion_mnist(tmp_path):
  make_fake_fmnist(tmp_path, n_train=20, n_test=5)
  tr, te = data.make_loaders("fashion_mnist", 4, data_dir=tmp_path, pad_to_32=True, seed=1)
  b = tr.batch(0, 0)
  assert b["image"].shape == (4, 32, 32, 1) and tr.steps_per_epoch == 5
  assert len(te) == 5 and not tr.transform.random


def test_tfds_path_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_tfds_arrays("cifar10", "train")
  assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (6,)
