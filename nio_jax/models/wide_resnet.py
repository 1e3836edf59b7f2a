"""Wide ResNet (Zagoruyko & Komodakis 2016) for CIFAR, pre-activation blocks
(reference: `models/gradinit_wide_resnet.py` of zhuchen03/gradinit).

WRN-d-k: 3 stages of n = (d-4)/6 blocks with 16k/32k/64k channels, 16-channel stem conv.
Block: [BN] -> ReLU -> conv3x3 -> dropout -> [BN] -> ReLU -> conv3x3(stride) + shortcut,
shortcut = conv1x1(stride) when the shape changes, else identity. As in the reference the
*second* conv carries the stride and every conv has a bias. Head: [BN] -> ReLU -> global average
pool (the reference's `avg_pool2d(8)` on 32x32 inputs) -> linear.

Initialisation: the reference does not re-initialise, so it is PyTorch's default:
conv and linear weights `kaiming_uniform_(a=sqrt(5))` = U(+-1/sqrt(fan_in)); conv biases 0
(`GradInitConv2d` zeroes them); linear bias U(+-1/sqrt(fan_in)); BN 1 / 0.
The reference's final BN uses torch `momentum=0.9` (i.e. Flax momentum 0.1): reproduced.
Dropout (`dropout_rate`, default 0) needs a `dropout` RNG when > 0 and `train=True`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ._common import (
  blocks_per_stage_6n4,
  bn_relu_pool,
  check_norm,
  conv,
  maybe_batch_norm,
  stack_tail,
  torch_default_bias,
  torch_default_kernel,
)


def _tconv(features, kernel, stride, name, dtype):
  # PyTorch default weight init; bias zeroed by the reference's GradInitConv2d.
  return conv(
    features, kernel, stride, bias=True, kernel_init=torch_default_kernel, name=name, dtype=dtype
  )


class WideBasic(nn.Module):
  """Wide ResNet block: (BN,) ReLU, 3x3 conv, optional dropout, (BN,) ReLU, 3x3 conv, plus
  the input (through a 1x1 conv when the shape changes)."""

  features: int
  stride: int = 1
  norm: str = "bn"
  dropout_rate: float = 0.0
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    use_bn = self.norm == "bn"
    h = maybe_batch_norm(x, use_bn, self.train, "bn1", dtype=self.dtype)
    h = _tconv(self.features, 3, 1, "conv1", self.dtype)(nn.relu(h))
    if self.dropout_rate > 0:
      h = nn.Dropout(self.dropout_rate, deterministic=not self.train)(h)
    h = maybe_batch_norm(h, use_bn, self.train, "bn2", dtype=self.dtype)
    h = _tconv(self.features, 3, self.stride, "conv2", self.dtype)(nn.relu(h))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _tconv(self.features, 1, self.stride, "shortcut", self.dtype)(x)
    return h + x, None


class WideResNet(nn.Module):
  """WRN-depth-widen. Params: `conv1`, `stage{s}_block0`, `stage{s}_scan`, `bn_final`,
  `linear`."""

  depth: int = 28
  widen: int = 10
  num_classes: int = 10
  norm: str = "bn"
  dropout_rate: float = 0.0
  scan: bool = True
  scan_unroll: int | bool | None = None  # `_common.resolve_unroll`: unrolled on CPU
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_bn = check_norm(self.norm)
    n = blocks_per_stage_6n4(self.depth, "WRN")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = _tconv(16, 3, 1, "conv1", self.dtype)(x)
    for s in range(3):
      feats = 16 * self.widen * 2**s
      kw = dict(norm=self.norm, dropout_rate=self.dropout_rate, train=train, dtype=self.dtype)
      x, _ = WideBasic(feats, 1 if s == 0 else 2, **kw, name=f"stage{s + 1}_block0")(x)
      x = stack_tail(
        WideBasic,
        n,
        f"stage{s + 1}",
        x,
        scan=self.scan,
        unroll=self.scan_unroll,
        features=feats,
        stride=1,
        **kw,
      )
    x = bn_relu_pool(x, use_bn, train, "bn_final", momentum=0.1, dtype=self.dtype)
    return nn.Dense(
      self.num_classes,
      kernel_init=torch_default_kernel,
      bias_init=torch_default_bias(x.shape[-1]),
      dtype=self.dtype,
      name="linear",
    )(x)
