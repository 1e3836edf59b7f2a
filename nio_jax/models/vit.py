"""Small Vision Transformers for 32x32 inputs (pre-LN encoder, Dosovitskiy et al. 2021).

Patch embedding: conv p x p / stride p -> tokens (+ a class token for `pool="cls"`) + learned
position embedding. Block: `x + Attn(LN(x))`, `x + MLP(LN(x))` with a fused `qkv` linear,
exact-erf GELU MLP of `mlp_ratio * dim`; final LN; linear head on the class token
(`pool="cls"`) or on the mean token (`pool="gap"`). LayerNorm eps 1e-6. No dropout.

Initialisation (timm `VisionTransformer` conventions; the GradInit/NIO releases have no ViT):
all linear weights (qkv, proj, MLP, head) N(0, 0.02^2) (timm's `trunc_normal_(std=.02)` with
its +-2 absolute bounds, i.e. effectively untruncated), linear biases 0; LayerNorm 1 / 0;
position embedding and class token N(0, 0.02^2); patch-embedding conv PyTorch default
(weight and bias U(+-1/sqrt(fan_in))).

Encoder blocks 1.. are scanned (`encoder_scan`) unless `scan=False`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._common import (
  normal_init,
  patch_embed,
  stack_tail,
  zeros,
)

_W = normal_init(0.02)


def _dense(features, name, dtype):
  return nn.Dense(features, kernel_init=_W, bias_init=zeros, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with one fused `qkv` projection."""

  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    h = self.num_heads
    qkv = _dense(3 * d, "qkv", self.dtype)(x).reshape(b, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (d // h) ** -0.5
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, n, d)
    return _dense(d, "proj", self.dtype)(out)


class Mlp(nn.Module):
  """The encoder block's MLP: dense, exact GELU, dense back to the input width."""

  hidden: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.gelu(_dense(self.hidden, "fc1", self.dtype)(x), approximate=False)
    return _dense(d, "fc2", self.dtype)(x)


class EncoderBlock(nn.Module):
  """Pre-norm ViT encoder block: attention and MLP, each residual."""

  num_heads: int
  mlp_ratio: float = 4.0
  eps: float = 1e-6
  train: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = x + Attention(self.num_heads, self.dtype, name="attn")(
      nn.LayerNorm(self.eps, dtype=self.dtype, name="norm1")(x)
    )
    x = x + Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(
      nn.LayerNorm(self.eps, dtype=self.dtype, name="norm2")(x)
    )
    return x, None


class ViT(nn.Module):
  """ViT. Params: `patch_embed`, `cls_token` (cls pooling), `pos_embed`,
  `encoder_block0`, `encoder_scan`, `norm`, `head`."""

  num_classes: int = 10
  patch_size: int = 4
  dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  pool: str = "cls"
  scan: bool = True
  scan_unroll: int | bool | None = None  # `_common.resolve_unroll`: unrolled on CPU
  eps: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
    if self.dim % self.num_heads:
      raise ValueError("dim must be divisible by num_heads")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = patch_embed(self.dim, self.patch_size, x.shape[-1], dtype=self.dtype)(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.dim)
    if self.pool == "cls":
      cls = self.param("cls_token", _W, (1, 1, self.dim)).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
    x = x + self.param("pos_embed", _W, (1, x.shape[1], self.dim)).astype(x.dtype)
    kw = dict(
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      eps=self.eps,
      train=train,
      dtype=self.dtype,
    )
    x, _ = EncoderBlock(**kw, name="encoder_block0")(x)
    x = stack_tail(
      EncoderBlock, self.depth, "encoder", x, scan=self.scan, unroll=self.scan_unroll, **kw
    )
    x = nn.LayerNorm(self.eps, dtype=self.dtype, name="norm")(x)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    return _dense(self.num_classes, "head", self.dtype)(x)
