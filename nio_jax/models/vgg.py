"""VGG for CIFAR (reference: `models/gradinit_vgg.py` of zhuchen03/gradinit).

Structure: the VGG config of conv3x3 (with bias, padding 1) [-> BN] -> ReLU layers and 2x2 max
pools; the feature map is 1x1x512 for a 32x32 input, flattened into one linear classifier.

Initialisation (reference `_initialize_weights`): convs `kaiming_normal_(mode='fan_out',
nonlinearity='relu')`, conv bias 0; BN scale 1 / shift 0; classifier weight N(0, 0.01^2),
bias 0.  Note the reference keeps conv biases even with BN.

`width_mult` divides every channel count (tests use e.g. 1/16); the input must be 32x32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ._common import check_norm, conv, maybe_batch_norm, normal_init, zeros

VGG_CFGS = {
  "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
  "vgg19": (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
  ),
}


def vgg_channels(cfg: str, width_mult: float):
  """The layer list of VGG config `cfg` (`VGG_CFGS`) with every width scaled by `width_mult`
  ("M" = max-pool)."""
  return tuple(v if v == "M" else max(1, int(round(v * width_mult))) for v in VGG_CFGS[cfg])


class VGG(nn.Module):
  """CIFAR VGG. `norm` is `"bn"` or `"none"`. Params: `conv{i}`, `bn{i}`, `classifier`."""

  cfg: str = "vgg19"
  num_classes: int = 10
  norm: str = "none"
  width_mult: float = 1.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_bn = check_norm(self.norm)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    i = 0
    for v in vgg_channels(self.cfg, self.width_mult):
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = conv(v, 3, 1, bias=True, name=f"conv{i}", dtype=self.dtype)(x)
        x = maybe_batch_norm(x, use_bn, train, f"bn{i}", dtype=self.dtype)
        x = nn.relu(x)
        i += 1
    x = x.reshape(x.shape[0], -1)  # 1x1 spatial for 32x32 inputs
    return nn.Dense(
      self.num_classes,
      kernel_init=normal_init(0.01),
      bias_init=zeros,
      dtype=self.dtype,
      name="classifier",
    )(x)
