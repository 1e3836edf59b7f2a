"""Small Flax NNX models (the NNX twins of `nio_jax.models.small`), to show NNX working with
nio_jax: use `nnx.split(model)` -> `(graphdef, params, rest)` and
`nnx.merge(graphdef, params, rest)` inside the loss (`nio_jax.flax_utils` has adapters).

`NNXMLP`: flatten -> [Linear -> ReLU] x len(hidden) -> Linear (attributes `dense0..`,
`head`). `NNXSmallCNN`: conv3x3 -> ReLU -> maxpool2, twice -> flatten (NHWC) -> Linear ->
ReLU -> Linear (`conv1`, `conv2`, `fc1`, `head`). Same architectures, parameter names
and PyTorch-default initialisation (U(+-1/sqrt(fan_in)) weights and biases) as the linen
`MLP` / `SmallCNN`; `__call__(x, train=False)` returns logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import jax
from flax import nnx

from ._common import torch_default_bias, torch_default_kernel


def _linear(din, dout, rngs):
  return nnx.Linear(
    din, dout, kernel_init=torch_default_kernel, bias_init=torch_default_bias(din), rngs=rngs
  )


class NNXMLP(nnx.Module):
  """Flax NNX twin of `nio_jax.models.MLP` (same layer names, PyTorch-default init)."""

  def __init__(
    self,
    in_features: int = 784,
    hidden: Sequence[int] = (256, 256),
    num_classes: int = 10,
    *,
    rngs: nnx.Rngs,
  ):
    dims = [in_features, *hidden]
    self.num_hidden = len(hidden)
    for i in range(len(hidden)):
      setattr(self, f"dense{i}", _linear(dims[i], dims[i + 1], rngs))
    self.head = _linear(dims[-1], num_classes, rngs)

  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for i in range(self.num_hidden):
      x = jax.nn.relu(getattr(self, f"dense{i}")(x))
    return self.head(x)


class NNXSmallCNN(nnx.Module):
  """Flax NNX twin of `nio_jax.models.SmallCNN` (same layer names, PyTorch-default init)."""

  def __init__(
    self,
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    num_classes: int = 10,
    image_size: int = 28,
    *,
    rngs: nnx.Rngs,
  ):
    cin, size = in_channels, image_size
    self.num_convs = len(channels)
    for i, c in enumerate(channels):
      setattr(
        self,
        f"conv{i + 1}",
        nnx.Conv(
          cin,
          c,
          (3, 3),
          padding=((1, 1), (1, 1)),
          kernel_init=torch_default_kernel,
          bias_init=torch_default_bias(9 * cin),
          rngs=rngs,
        ),
      )
      cin, size = c, size // 2
    self.fc1 = _linear(prod((size, size, cin)), hidden, rngs)
    self.head = _linear(hidden, num_classes, rngs)

  def __call__(self, x, train: bool = False):
    for i in range(self.num_convs):
      x = getattr(self, f"conv{i + 1}")(x)
      x = nnx.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2))
    x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.head(x)


__all__ = ["NNXMLP", "NNXSmallCNN"]
