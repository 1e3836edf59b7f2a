"""CIFAR ResNets (He et al. 2016, 6n+2 layers: 3 stages of 16/32/64 channels, basic blocks).

Reference: `models/gradinit_resnet_cifar.py` and `models/fixup_resnet_cifar.py` of the
GradInit release (zhuchen03/gradinit), Fixup rules from Zhang et al. 2019.

Variants
--------
`variant="standard", norm="bn"` (GradInit's ResNet with BN)
    conv3x3 (no bias) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU.
    Down-sampling shortcut ("option A" as in the reference): 1x1 average pool with stride 2
    (= spatial subsampling `x[:, ::2, ::2]`), then a BatchNorm over the input channels (the
    reference puts one there), then zero channel padding.
`variant="standard", norm="none"` (GradInit's ResNet without BN)
    Same without any BN; every conv has a bias (initialised to 0), shortcut = subsample + zero pad.
`variant="fixup"` (norm is always none)
    Fixup block: `relu(conv2(relu(conv1(x + b1a) + b1b) + b2a) * scale + b2b + shortcut(x + b1a))`
    with scalar biases `bias*` (init 0) and a scalar multiplier `scale` (init 1) per branch;
    stem `relu(conv1(x) + bias1)`, classifier `fc(pool + bias2)`.

Initialisation (`variant="standard"`, both norms), as in the reference:
    every conv: `kaiming_normal_(mode='fan_out', nonlinearity='relu')` = N(0, 2 / (9 * C_out)),
    conv biases 0; BN scale 1, shift 0; classifier weight PyTorch default
    (`kaiming_uniform_(a=sqrt(5))` = U(+-1/sqrt(fan_in))), classifier bias 0.
Initialisation (`variant="fixup"`, `fixup_rescale=True`, the Fixup rules):
    stem conv He fan_out normal; first conv of every branch He fan_out normal times
    `L^(-1/(2m-2)) = L^(-1/2)` (L = 3n branches, m = 2 layers per branch); last conv of every
    branch 0; classifier weight and bias 0; scalar biases 0, multipliers 1.
    `fixup_rescale=False` gives the reference's `fixup_resnet_cifar.py` init instead (all
    convs He fan_out normal, classifier weight PyTorch default, bias 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ._common import (
  check_norm,
  conv,
  he_normal_fan_out,
  he_normal_fan_out_scaled,
  maybe_batch_norm,
  ones,
  stack_tail,
  torch_default_kernel,
  zero_pad_channels,
  zeros,
)

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)


def fixup_multiplier(num_branches: int, layers_per_branch: int) -> float:
  """Fixup's rescaling `L^(-1/(2m-2))` of the non-final layers of each residual branch.

  Raises:
    ValueError: `layers_per_branch < 2` or `num_branches < 1`.
  """
  if layers_per_branch < 2:
    raise ValueError(f"Fixup needs >= 2 layers per branch, got {layers_per_branch}")
  if num_branches < 1:
    raise ValueError(f"num_branches must be >= 1, got {num_branches}")
  return float(num_branches) ** (-1.0 / (2 * layers_per_branch - 2))


class BasicBlock(nn.Module):
  """Basic residual block (reference `GradInitBasicBlock`). Returns `(x, None)` (scan)."""

  features: int
  stride: int = 1
  norm: str = "bn"
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    use_bn = self.norm == "bn"
    out = conv(self.features, 3, self.stride, bias=not use_bn, name="conv1", dtype=self.dtype)(x)
    out = maybe_batch_norm(out, use_bn, self.train, "bn1", dtype=self.dtype)
    out = nn.relu(out)
    out = conv(self.features, 3, 1, bias=not use_bn, name="conv2", dtype=self.dtype)(out)
    out = maybe_batch_norm(out, use_bn, self.train, "bn2", dtype=self.dtype)
    shortcut = x
    if self.stride != 1:
      shortcut = x[:, :: self.stride, :: self.stride, :]
      shortcut = maybe_batch_norm(shortcut, use_bn, self.train, "shortcut_bn", dtype=self.dtype)
    shortcut = zero_pad_channels(shortcut, self.features)
    return nn.relu(out + shortcut), None


class FixupBasicBlock(nn.Module):
  """Fixup basic block (reference `GradInitNoBNBasicBlock`). Returns `(x, None)`."""

  features: int
  stride: int = 1
  num_branches: int = 1
  rescale: bool = True
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    def scalar(name, init=zeros):
      p = self.param(name, init, (1,))
      return p if self.dtype is None else p.astype(self.dtype)

    if self.rescale:
      k1 = he_normal_fan_out_scaled(fixup_multiplier(self.num_branches, 2))
      k2 = zeros
    else:
      k1 = k2 = he_normal_fan_out
    xb = x + scalar("bias1a")
    out = conv(self.features, 3, self.stride, kernel_init=k1, name="conv1", dtype=self.dtype)(xb)
    out = nn.relu(out + scalar("bias1b"))
    out = conv(self.features, 3, 1, kernel_init=k2, name="conv2", dtype=self.dtype)(
      out + scalar("bias2a")
    )
    out = out * scalar("scale", ones) + scalar("bias2b")
    shortcut = x
    if self.stride != 1:
      shortcut = xb[:, :: self.stride, :: self.stride, :]
    shortcut = zero_pad_channels(shortcut, self.features)
    return nn.relu(out + shortcut), None


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2). See the module docstring for the exact variants and inits.

  Attributes:
    depth: 6n+2 (20, 32, 44, 56, 110, 1202, or any other 6n+2, e.g. 8 for tests).
    num_classes: logits size.
    norm: `"bn"` (default for `variant="standard"`) or `"none"`.
    variant: `"standard"` or `"fixup"` (no normalisation).
    scan: `nn.scan` blocks 1..n-1 of every stage (`stage{s}_scan`); `False` = unrolled
      `stage{s}_block{i}`. Convert with `unstack_blocks`/`stack_blocks`.
    scan_unroll: how the scan compiles (`_common.resolve_unroll`): None = unrolled on
      XLA:CPU (up to 32 blocks per stage; a while loop there is many times slower), rolled
      elsewhere. The parameter layout is the scanned one either way.
    width: channels of the first stage (16 in the paper).
    fixup_rescale: Fixup only; see module docstring.

  `__call__(x, train=False, *, return_features=False)`: with `return_features` the pooled
  64-d features (after Fixup's `bias2`) are returned instead of the logits.
  """

  depth: int = 20
  num_classes: int = 10
  norm: str | None = None
  variant: str = "standard"
  scan: bool = True
  scan_unroll: int | bool | None = None
  width: int = 16
  fixup_rescale: bool = True
  dtype: Any = None

  def _resolved_norm(self) -> str:
    if self.variant not in ("standard", "fixup"):
      raise ValueError(f"variant must be 'standard' or 'fixup', got {self.variant!r}")
    norm = self.norm
    if self.variant == "fixup":
      if norm not in (None, "none"):
        raise ValueError("variant='fixup' has no normalisation; use norm='none' or leave it")
      return "none"
    norm = "bn" if norm is None else norm
    check_norm(norm)
    return norm

  @property
  def blocks_per_stage(self) -> int:
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8, got {self.depth}")
    return (self.depth - 2) // 6

  @nn.compact
  def __call__(self, x, train: bool = False, *, return_features: bool = False):
    norm = self._resolved_norm()
    n = self.blocks_per_stage
    fixup = self.variant == "fixup"
    use_bn = norm == "bn"
    dtype = self.dtype
    if dtype is not None:
      x = x.astype(dtype)

    x = conv(self.width, 3, 1, bias=not use_bn and not fixup, name="conv1", dtype=dtype)(x)
    x = maybe_batch_norm(x, use_bn, train, "bn1", dtype=dtype)
    if fixup:
      x = x + self.param("bias1", zeros, (1,)).astype(x.dtype)
    x = nn.relu(x)

    for s in range(3):
      feats = self.width * 2**s
      stride = 1 if s == 0 else 2
      if fixup:
        cls = FixupBasicBlock
        kw = dict(num_branches=3 * n, rescale=self.fixup_rescale)
      else:
        cls = BasicBlock
        kw = dict(norm=norm)
      # block0 may down-sample; the remaining n-1 blocks are identical (scanned).
      x, _ = cls(feats, stride, **kw, train=train, dtype=dtype, name=f"stage{s + 1}_block0")(x)
      x = stack_tail(
        cls,
        n,
        f"stage{s + 1}",
        x,
        scan=self.scan,
        unroll=self.scan_unroll,
        features=feats,
        stride=1,
        train=train,
        dtype=dtype,
        **kw,
      )

    x = jnp.mean(x, axis=(1, 2))
    if fixup:
      x = x + self.param("bias2", zeros, (1,)).astype(x.dtype)
    if return_features:
      return x
    fc_kernel = zeros if (fixup and self.fixup_rescale) else torch_default_kernel
    x = nn.Dense(self.num_classes, kernel_init=fc_kernel, bias_init=zeros, dtype=dtype, name="fc")(
      x
    )
    return x


__all__ = [
  "BasicBlock",
  "FixupBasicBlock",
  "CifarResNet",
  "CIFAR_RESNET_DEPTHS",
  "fixup_multiplier",
]
