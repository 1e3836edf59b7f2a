"""PyTorch twins of the `nio_jax.models` zoo (same structure, same module names, same init
rules), plus `load_flax_variables` that copies Flax params / batch_stats into them.

Module attribute names equal the Flax module names of the *unrolled* (`scan=False`) layout,
so the loader is generic: a Flax path `a/b/kernel` becomes the torch key `a.b.weight`
(conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in); BN `scale`/`bias`/`mean`/
`var` -> `weight`/`bias`/`running_mean`/`running_var`). Scanned blocks are unstacked
first. Inputs are NCHW; flattening before a linear layer is done in NHWC order to match Flax.

Build by registry name with `get` (same names and kwargs as `nio_jax.models.get`). The
twins live in `cnns` (convolutional networks) and `transformers` (ViT, Swin); the small
models (MLP, SmallCNN), the registry and the loader here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nio_jax.bench.torch_baseline.cnns import VGG, CifarResNet, DenseNet, ResNetImageNet, WideResNet
from nio_jax.bench.torch_baseline.layers import conv, flatten_nhwc
from nio_jax.bench.torch_baseline.transformers import Swin, ViT

# ------------------------------------------------------------------------------------------
# small models
# ------------------------------------------------------------------------------------------


class MLP(nn.Module):
  """Multi-layer perceptron with ReLU (`nio_jax.models.MLP`)."""

  def __init__(self, hidden=(256, 256), num_classes=10, in_features=784):
    super().__init__()
    self.names = []
    cin = in_features
    for i, h in enumerate(hidden):
      setattr(self, f"dense{i}", nn.Linear(cin, h))
      self.names.append(f"dense{i}")
      cin = h
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = flatten_nhwc(x) if x.dim() == 4 else x.flatten(1)
    for n in self.names:
      x = F.relu(getattr(self, n)(x))
    return self.head(x)


class SmallCNN(nn.Module):
  """Small CNN: conv-ReLU-max-pool stages, one hidden dense layer (`nio_jax.models.SmallCNN`)."""

  def __init__(self, channels=(32, 64), hidden=128, num_classes=10, in_channels=1, image_size=28):
    super().__init__()
    cin, size = in_channels, image_size
    self.convs = []
    for i, c in enumerate(channels):
      setattr(self, f"conv{i + 1}", conv(cin, c, 3, bias=True))
      self.convs.append(f"conv{i + 1}")
      cin, size = c, size // 2
    self.fc1 = nn.Linear(cin * size * size, hidden)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x):
    for n in self.convs:
      x = F.max_pool2d(F.relu(getattr(self, n)(x)), 2, 2)
    return self.head(F.relu(self.fc1(flatten_nhwc(x))))


# ------------------------------------------------------------------------------------------
# registry (mirrors nio_jax.models) and the Flax -> torch loader
# ------------------------------------------------------------------------------------------


_CTORS = {
  "CifarResNet": CifarResNet,
  "VGG": VGG,
  "DenseNet": DenseNet,
  "WideResNet": WideResNet,
  "ResNetImageNet": ResNetImageNet,
  "ViT": ViT,
  "Swin": Swin,
  "MLP": MLP,
  "SmallCNN": SmallCNN,
}


def get(name: str, **kwargs) -> nn.Module:
  """Torch twin of `nio_jax.models.get(name, **kwargs)` (uses the Flax registry's defaults).

  Extra torch-only kwargs: `in_channels` (all but MLP), `image_size` (ViT, SmallCNN),
  `in_features` (MLP); `image_size` also for Swin; defaults follow
  `nio_jax.models.input_shape(name)`.
  """
  from nio_jax import models as flax_models

  ctor, defaults, shape = flax_models.registry_entry(name)  # ValueError for unknown names
  cls = _CTORS[ctor.__name__]
  kw = {**defaults, **kwargs}
  kw.pop("dtype", None)
  if cls is MLP:
    kw.setdefault("in_features", math.prod(shape))
  else:
    kw.setdefault("in_channels", shape[2])
  if cls in (ViT, SmallCNN, Swin):
    kw.setdefault("image_size", shape[0])
  return cls(**kw)


def num_params(model: nn.Module) -> int:
  """The number of parameters of `model`."""
  return sum(p.numel() for p in model.parameters())


_LEAF_ALIASES = {
  "kernel": "weight",
  "scale": "weight",
  "mean": "running_mean",
  "var": "running_var",
}


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def load_flax_variables(model: nn.Module, variables: Mapping, strict: bool = True) -> nn.Module:
  """Copy Flax `{'params': ..., 'batch_stats': ...}` into the torch twin `model` (in place).

  Scanned blocks are unstacked first; conv kernels HWIO -> OIHW, dense (in, out) -> (out, in).
  With `strict`, every torch parameter/buffer (except `num_batches_tracked`) must be set.
  """
  from nio_jax.models import unstack_blocks

  variables = unstack_blocks(dict(variables))
  sd = model.state_dict()
  new = {}
  for coll in ("params", "batch_stats"):
    for path, arr in _flatten(variables.get(coll, {})):
      mod, leaf = ".".join(path[:-1]), path[-1]
      key = None
      for cand in (leaf, _LEAF_ALIASES.get(leaf)):
        if cand is None:
          continue
        k = f"{mod}.{cand}" if mod else cand
        if k in sd:
          key = k
          break
      if key is None:
        raise KeyError(f"no torch tensor for Flax {coll}/{'/'.join(path)}")
      t = torch.from_numpy(np.array(arr, dtype=np.float32))
      if leaf == "kernel" and t.dim() == 4:
        t = t.permute(3, 2, 0, 1)
      elif leaf == "kernel" and t.dim() == 2:
        t = t.t()
      if tuple(t.shape) != tuple(sd[key].shape):
        raise ValueError(
          f"shape mismatch for {key}: flax {tuple(t.shape)} vs torch {tuple(sd[key].shape)}"
        )
      new[key] = t.contiguous()
  if strict:
    missing = [k for k in sd if k not in new and not k.endswith("num_batches_tracked")]
    if missing:
      raise KeyError(f"torch tensors not set from Flax variables: {missing}")
  model.load_state_dict(new, strict=False)
  return model
