"""Small models for Fashion-MNIST / MNIST (28x28x1, or 32x32 padded) and quick tests.

`MLP`: flatten -> [Dense -> ReLU] x len(hidden) -> Dense. Params `dense{i}`, `head`.
`SmallCNN`: conv3x3(32) -> ReLU -> maxpool2 -> conv3x3(64) -> ReLU -> maxpool2 -> flatten
(NHWC order) -> Dense(128) -> ReLU -> Dense. Params `conv1`, `conv2`, `fc1`, `head`.

Initialisation: PyTorch defaults for every layer (weights `kaiming_uniform_(a=sqrt(5))` =
U(+-1/sqrt(fan_in)), biases U(+-1/sqrt(fan_in))), i.e. what a plain `nn.Linear` /
`nn.Conv2d` PyTorch model gets. `MLP(dense_init="he_normal")` instead draws every kernel from
N(0, 2/fan_in) (He / Kaiming normal, fan-in, as the CIFAR nets' convolutions) with zero
biases.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import flax.linen as nn

from ._common import conv, torch_default_bias, torch_default_kernel

DENSE_INITS = ("torch", "he_normal")


def _tdense(features, fan_in, name, dtype, init="torch"):
  if init == "he_normal":
    kernel, bias = nn.initializers.he_normal(), nn.initializers.zeros
  else:
    kernel, bias = torch_default_kernel, torch_default_bias(fan_in)
  return nn.Dense(features, kernel_init=kernel, bias_init=bias, dtype=dtype, name=name)


class MLP(nn.Module):
  """Plain ReLU MLP. `dense_init`: "torch" (PyTorch's nn.Linear default) or "he_normal"."""

  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  dtype: Any = None
  dense_init: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.dense_init not in DENSE_INITS:
      raise ValueError(f"MLP dense_init={self.dense_init!r}; known: {', '.join(DENSE_INITS)}")
    x = x.reshape(x.shape[0], -1)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i, h in enumerate(self.hidden):
      x = nn.relu(_tdense(h, x.shape[-1], f"dense{i}", self.dtype, self.dense_init)(x))
    return _tdense(self.num_classes, x.shape[-1], "head", self.dtype, self.dense_init)(x)


class SmallCNN(nn.Module):
  """Small CNN (Fashion-MNIST): 3x3 conv, ReLU and 2x2 max-pool per entry of `channels`,
  then a hidden dense layer (`fc1`) and the `head`; PyTorch-default init."""

  channels: Sequence[int] = (32, 64)
  hidden: int = 128
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i, c in enumerate(self.channels):
      fan_in = 9 * x.shape[-1]
      x = conv(
        c,
        3,
        1,
        bias=True,
        kernel_init=torch_default_kernel,
        bias_init=torch_default_bias(fan_in),
        name=f"conv{i + 1}",
        dtype=self.dtype,
      )(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(_tdense(self.hidden, prod(x.shape[1:]), "fc1", self.dtype)(x))
    return _tdense(self.num_classes, x.shape[-1], "head", self.dtype)(x)
