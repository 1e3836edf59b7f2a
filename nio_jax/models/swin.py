"""A small Swin Transformer (Liu et al. 2021) for 32x32 inputs.

Patch embedding conv p x p / stride p -> LayerNorm; stages of Swin blocks (window attention
with a learned relative-position bias; every second block of a stage uses windows shifted by
`window // 2` with the standard attention mask), patch merging (2x2 neighbour concat ->
LayerNorm -> linear 4C -> 2C, no bias) between stages; final LayerNorm, global average pool,
linear head. If a stage's resolution is <= the window, the window is the whole map and there is
no shift (as in the reference implementation). LayerNorm eps 1e-5, exact GELU, no dropout /
drop-path. Blocks alternate shifted/unshifted, so they are unrolled (`stage{s}_layer{i}`) and
not scanned.

Initialisation (Swin reference / timm conventions): every linear weight N(0, 0.02^2) (timm's
`trunc_normal_(std=.02)`, whose +-2 absolute bounds make it effectively untruncated), linear
biases 0, LayerNorm 1 / 0, relative-position bias tables N(0, 0.02^2), patch-embedding conv
PyTorch default (weight and bias U(+-1/sqrt(fan_in))).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._common import normal_init, patch_embed, zeros

_W = normal_init(0.02)


def relative_position_index(window: int) -> np.ndarray:
  """(w*w, w*w) indices into the ((2w-1)^2, heads) bias table (Swin's construction)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """(num_windows, w*w, w*w) additive mask (0 / -100) of shifted-window attention."""
  img = np.zeros((h, w), np.int32)
  cnt = 0
  for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
    for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
      img[hs, ws] = cnt
      cnt += 1
  win = (
    img.reshape(h // window, window, w // window, window)
    .transpose(0, 2, 1, 3)
    .reshape(-1, window * window)
  )
  return np.where(win[:, None, :] != win[:, :, None], -100.0, 0.0).astype(np.float32)


def window_partition(x, window):
  """`[B, H, W, C]` -> `[B * windows, window², C]`: the tokens of each window, in order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(x, window, b, h, w):
  """Inverse of `window_partition`: `[B * windows, window², C]` -> `[B, H, W, C]`."""
  c = x.shape[-1]
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _dense(features, name, dtype, bias=True):
  return nn.Dense(features, use_bias=bias, kernel_init=_W, bias_init=zeros, dtype=dtype, name=name)


class WindowAttention(nn.Module):
  """Multi-head self-attention within each window, with a learned relative position bias."""

  num_heads: int
  window: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, mask=None):
    bw, n, d = x.shape
    h = self.num_heads
    table = self.param("relative_position_bias_table", _W, ((2 * self.window - 1) ** 2, h))
    idx = relative_position_index(self.window)
    bias = table[idx.reshape(-1)].reshape(n, n, h).transpose(2, 0, 1)  # (h, n, n)
    qkv = _dense(3 * d, "qkv", self.dtype)(x).reshape(bw, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (d // h) ** -0.5 + bias.astype(q.dtype)
    if mask is not None:
      nw = mask.shape[0]
      logits = (
        logits.reshape(bw // nw, nw, h, n, n) + jnp.asarray(mask, logits.dtype)[None, :, None]
      )
      logits = logits.reshape(bw, h, n, n)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(bw, n, d)
    return _dense(d, "proj", self.dtype)(out)


class SwinBlock(nn.Module):
  """Swin block: (shifted) window attention and an MLP, each pre-norm and residual; the
  window shrinks to the feature map (and the shift to 0) when the map is smaller."""

  num_heads: int
  window: int
  shift: int = 0
  mlp_ratio: float = 4.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    window, shift = self.window, self.shift
    if min(hh, ww) <= window:
      window, shift = min(hh, ww), 0
    y = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm1")(x)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask = shifted_window_mask(hh, ww, window, shift) if shift else None
    y = WindowAttention(self.num_heads, window, self.dtype, name="attn")(
      window_partition(y, window), mask
    )
    y = window_reverse(y, window, b, hh, ww)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + y
    y = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm2")(x)
    y = nn.gelu(_dense(int(c * self.mlp_ratio), "fc1", self.dtype)(y), approximate=False)
    return x + _dense(c, "fc2", self.dtype)(y)


class PatchMerging(nn.Module):
  """Swin patch merging: each 2x2 group of tokens concatenated, normalised and projected to
  twice the channels."""

  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = jnp.concatenate(
      [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
    )
    x = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)
    return _dense(2 * c, "reduction", self.dtype, bias=False)(x)


class Swin(nn.Module):
  """Small Swin. Params: `patch_embed`, `patch_norm`, `stage{s}_layer{i}`,
  `merge{s}`, `norm`, `head`."""

  num_classes: int = 10
  patch_size: int = 2
  embed_dim: int = 48
  depths: Sequence[int] = (2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12)
  window: int = 4
  mlp_ratio: float = 4.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = patch_embed(self.embed_dim, self.patch_size, x.shape[-1], dtype=self.dtype)(x)
    x = nn.LayerNorm(1e-5, dtype=self.dtype, name="patch_norm")(x)
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      if s > 0:
        x = PatchMerging(self.dtype, name=f"merge{s}")(x)
      for i in range(depth):
        x = SwinBlock(
          heads,
          self.window,
          0 if i % 2 == 0 else self.window // 2,
          self.mlp_ratio,
          self.dtype,
          name=f"stage{s + 1}_layer{i}",
        )(x)
    x = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)
    x = jnp.mean(x, axis=(1, 2))
    return _dense(self.num_classes, "head", self.dtype)(x)
