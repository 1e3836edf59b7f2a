"""ImageNet ResNet-50 (bottleneck, torchvision "v1.5": stride on the 3x3 conv), as used by the
NIO ImageNet experiment (torchvision `resnet50`).

Stem: conv7x7/2 (no bias) -> BN -> ReLU -> maxpool3x3/2 (padding 1). Stages of
[3, 4, 6, 3] bottlenecks (1x1 -> 3x3(stride) -> 1x1 x4, BN after each) with widths
64/128/256/512 (x `width/64`); projection shortcut conv1x1(stride) + BN on the first block of
each stage. Global average pool, linear classifier.

Initialisation (torchvision): convs `kaiming_normal_(mode='fan_out', nonlinearity='relu')`,
BN 1 / 0 (`zero_init_residual=False`), classifier PyTorch default: weight
`kaiming_uniform_(a=sqrt(5))` = U(+-1/sqrt(fan_in)), bias U(+-1/sqrt(fan_in)).

Blocks 1.. of every stage are scanned (`layer{s}_scan`) unless `scan=False`.
`width` (default 64) shrinks the network for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ._common import batch_norm, conv, stack_tail, torch_default_bias, torch_default_kernel


class Bottleneck(nn.Module):
  """ImageNet ResNet bottleneck block: 1x1, 3x3, 1x1 convs with BN, `expansion` times
  `planes` output channels, a projection shortcut when the shape changes."""

  planes: int
  stride: int = 1
  expansion: int = 4
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    out_feats = self.planes * self.expansion
    h = conv(self.planes, 1, name="conv1", dtype=self.dtype)(x)
    h = nn.relu(batch_norm(self.train, "bn1", dtype=self.dtype)(h))
    h = conv(self.planes, 3, self.stride, name="conv2", dtype=self.dtype)(h)
    h = nn.relu(batch_norm(self.train, "bn2", dtype=self.dtype)(h))
    h = conv(out_feats, 1, name="conv3", dtype=self.dtype)(h)
    h = batch_norm(self.train, "bn3", dtype=self.dtype)(h)
    if self.stride != 1 or x.shape[-1] != out_feats:
      x = conv(out_feats, 1, self.stride, padding=0, name="downsample_conv", dtype=self.dtype)(x)
      x = batch_norm(self.train, "downsample_bn", dtype=self.dtype)(x)
    return nn.relu(h + x), None


class ResNetImageNet(nn.Module):
  """Bottleneck ResNet. Params: `conv1`, `bn1`, `layer{s}_block0`, `layer{s}_scan`, `fc`."""

  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_classes: int = 1000
  scan: bool = True
  scan_unroll: int | bool | None = None  # `_common.resolve_unroll`: unrolled on CPU
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = conv(self.width, 7, 2, padding=3, name="conv1", dtype=self.dtype)(x)
    x = nn.relu(batch_norm(train, "bn1", dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, n in enumerate(self.layers):
      planes = self.width * 2**s
      x, _ = Bottleneck(
        planes, 1 if s == 0 else 2, train=train, dtype=self.dtype, name=f"layer{s + 1}_block0"
      )(x)
      x = stack_tail(
        Bottleneck,
        n,
        f"layer{s + 1}",
        x,
        scan=self.scan,
        unroll=self.scan_unroll,
        planes=planes,
        stride=1,
        train=train,
        dtype=self.dtype,
      )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      kernel_init=torch_default_kernel,
      bias_init=torch_default_bias(x.shape[-1]),
      dtype=self.dtype,
      name="fc",
    )(x)
