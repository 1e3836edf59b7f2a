"""Layers and init helpers shared by the PyTorch twins (mirroring `nio_jax.models._common`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def he_fan_out(w, multiplier=1.0):
  """He fan-out normal init of `w` (ReLU gain), times `multiplier`."""
  nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
  if multiplier != 1.0:
    with torch.no_grad():
      w.mul_(multiplier)


def zero(t):
  """Zeroes `t` in place (None: nothing to do)."""
  if t is not None:
    nn.init.zeros_(t)


def init_conv_bn(model: nn.Module, skip_conv=None):
  """The GradInit reference's init of the CNNs: conv weights He fan-out normal with zero
  biases, BN weight 1 and bias 0 (module order, so the RNG draws are the reference's).
  `skip_conv(name)` True leaves that conv as it is (Fixup's branch convs)."""
  for name, m in model.named_modules():
    if isinstance(m, nn.Conv2d) and not (skip_conv is not None and skip_conv(name)):
      he_fan_out(m.weight)
      zero(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


def conv(cin, cout, k, stride=1, padding=None, bias=False):
  """`nn.Conv2d` with "same" padding for odd `k` by default (no bias unless asked)."""
  return nn.Conv2d(
    cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias
  )


def pad_channels(x, features):
  """Zero-pads the channels of NCHW `x` up to `features` (option-A shortcut)."""
  extra = features - x.shape[1]
  if extra == 0:
    return x
  return torch.cat([x, x.new_zeros((x.shape[0], extra) + tuple(x.shape[2:]))], 1)


def run_blocks(module: nn.Module, names, x):
  """Applies `module`'s sub-modules `names` to `x` in order (flat attribute names, so the
  state-dict keys match the Flax params)."""
  for name in names:
    x = getattr(module, name)(x)
  return x


def bn_relu_pool(x, bn):
  """Optional final BN (`bn` None: none), ReLU and global average pooling of NCHW `x`."""
  if bn is not None:
    x = bn(x)
  return F.relu(x).mean((2, 3))


def flatten_nhwc(x):
  """Flattens an NCHW tensor in NHWC order, as Flax does before a dense layer."""
  return x.permute(0, 2, 3, 1).flatten(1)


def vit_linear(i, o):
  """`nn.Linear` initialised as the ViT reference: weight N(0, 0.02²), bias 0."""
  lin = nn.Linear(i, o)
  nn.init.normal_(lin.weight, 0, 0.02)
  zero(lin.bias)
  return lin
