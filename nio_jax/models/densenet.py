"""DenseNet-BC for CIFAR (reference: `models/gradinit_densenet.py` of zhuchen03/gradinit,
itself derived from torchvision's DenseNet).

DenseNet-100 (BC): growth rate 12, 3 dense blocks of 16 bottleneck layers
(depth = 6n + 4), 24 initial features (2 x growth), compression 0.5, bottleneck width 4 x growth,
3x3 stem conv (small inputs), no dropout.
Layer: [BN] -> ReLU -> conv1x1 -> [BN] -> ReLU -> conv3x3, output concatenated to the input.
Transition: [BN] -> ReLU -> conv1x1 -> avgpool 2x2. Head: [BN] -> ReLU -> global avg -> linear.
`norm="none"`: no BN; convs then have biases (reference `bias=not use_bn`).

Initialisation (reference): conv weights N(0, 2 / (C_out * k * k)) (= He fan_out normal), conv
biases 0, BN 1 / 0, classifier weight PyTorch default (`kaiming_uniform_(a=sqrt(5))`),
classifier bias 0.

The layers of a dense block have different input widths, so they are not scanned.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ._common import (
  blocks_per_stage_6n4,
  bn_relu_pool,
  check_norm,
  conv,
  maybe_batch_norm,
  torch_default_kernel,
  zeros,
)


class DenseLayer(nn.Module):
  """DenseNet-BC bottleneck layer: (BN,) ReLU, 1x1 conv, (BN,) ReLU, 3x3 conv; its
  `growth_rate` output channels are concatenated to the input."""

  growth_rate: int
  bn_size: int = 4
  norm: str = "bn"
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    use_bn = self.norm == "bn"
    h = maybe_batch_norm(x, use_bn, self.train, "norm1", dtype=self.dtype)
    h = conv(self.bn_size * self.growth_rate, 1, bias=not use_bn, name="conv1", dtype=self.dtype)(
      nn.relu(h)
    )
    h = maybe_batch_norm(h, use_bn, self.train, "norm2", dtype=self.dtype)
    h = conv(self.growth_rate, 3, bias=not use_bn, name="conv2", dtype=self.dtype)(nn.relu(h))
    return jnp.concatenate([x, h], axis=-1)


class Transition(nn.Module):
  """DenseNet transition between dense blocks: (BN,) ReLU, 1x1 conv, 2x2 average pooling."""

  features: int
  norm: str = "bn"
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    use_bn = self.norm == "bn"
    x = maybe_batch_norm(x, use_bn, self.train, "norm", dtype=self.dtype)
    x = conv(self.features, 1, bias=not use_bn, name="conv", dtype=self.dtype)(nn.relu(x))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet-BC. Params: `conv0`, `block{b}_layer{i}`, `transition{b}`, `norm_final`,
  `classifier`."""

  depth: int = 100
  growth_rate: int = 12
  num_classes: int = 10
  norm: str = "bn"
  compression: float = 0.5
  bn_size: int = 4
  num_init_features: int | None = None  # default 2 * growth_rate
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_bn = check_norm(self.norm)
    n = blocks_per_stage_6n4(self.depth, "DenseNet-BC")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    feats = self.num_init_features or 2 * self.growth_rate
    x = conv(feats, 3, bias=not use_bn, name="conv0", dtype=self.dtype)(x)
    for b in range(3):
      for i in range(n):
        x = DenseLayer(
          self.growth_rate,
          self.bn_size,
          self.norm,
          train,
          self.dtype,
          name=f"block{b + 1}_layer{i + 1}",
        )(x)
      feats = feats + n * self.growth_rate
      if b != 2:
        feats = int(feats * self.compression)
        x = Transition(feats, self.norm, train, self.dtype, name=f"transition{b + 1}")(x)
    x = bn_relu_pool(x, use_bn, train, "norm_final", dtype=self.dtype)
    return nn.Dense(
      self.num_classes,
      kernel_init=torch_default_kernel,
      bias_init=zeros,
      dtype=self.dtype,
      name="classifier",
    )(x)
