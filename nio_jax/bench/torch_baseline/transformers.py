"""PyTorch twins of the transformers of `nio_jax.models`: ViT and Swin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nio_jax.bench.torch_baseline.layers import (
  run_blocks,
  vit_linear,
)

# ------------------------------------------------------------------------------------------
# ViT
# ------------------------------------------------------------------------------------------


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = vit_linear(dim, 3 * dim)
    self.proj = vit_linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = torch.einsum("bnhd,bmhd->bhnm", q, k) * (d // h) ** -0.5
    out = torch.einsum("bhnm,bmhd->bnhd", attn.softmax(-1), v).reshape(b, n, d)
    return self.proj(out)


class Mlp(nn.Module):
  """The transformer block's two-layer MLP (GELU)."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = vit_linear(dim, hidden)
    self.fc2 = vit_linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
  """Pre-norm ViT encoder block: attention and MLP, each residual."""

  def __init__(self, dim, num_heads, mlp_ratio, eps):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
  """Vision Transformer (`nio_jax.models.ViT`)."""

  def __init__(
    self,
    num_classes=10,
    patch_size=4,
    dim=192,
    depth=12,
    num_heads=3,
    mlp_ratio=4.0,
    pool="cls",
    scan=None,
    eps=1e-6,
    image_size=32,
    in_channels=3,
  ):
    super().__init__()
    self.pool = pool
    self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
    n_tok = (image_size // patch_size) ** 2 + (1 if pool == "cls" else 0)
    if pool == "cls":
      self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, n_tok, dim) * 0.02)
    self.blocks = []
    for i in range(depth):
      setattr(self, f"encoder_block{i}", EncoderBlock(dim, num_heads, mlp_ratio, eps))
      self.blocks.append(f"encoder_block{i}")
    self.norm = nn.LayerNorm(dim, eps=eps)
    self.head = vit_linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    if self.pool == "cls":
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
    x = x + self.pos_embed
    x = self.norm(run_blocks(self, self.blocks, x))
    x = x[:, 0] if self.pool == "cls" else x.mean(1)
    return self.head(x)


# ------------------------------------------------------------------------------------------
# Swin
# ------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
  """Swin window attention with a relative position bias table."""

  def __init__(self, dim, num_heads, window):
    super().__init__()
    from nio_jax.models.swin import relative_position_index

    self.num_heads, self.window = num_heads, window
    self.relative_position_bias_table = nn.Parameter(
      torch.randn((2 * window - 1) ** 2, num_heads) * 0.02
    )
    self.register_buffer(
      "rel_index", torch.from_numpy(relative_position_index(window).reshape(-1)), persistent=False
    )
    self.qkv = vit_linear(dim, 3 * dim)
    self.proj = vit_linear(dim, dim)

  def forward(self, x, mask=None):
    bw, n, d = x.shape
    h = self.num_heads
    bias = self.relative_position_bias_table[self.rel_index].reshape(n, n, h).permute(2, 0, 1)
    qkv = self.qkv(x).reshape(bw, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * (d // h) ** -0.5 + bias
    if mask is not None:
      nw = mask.shape[0]
      logits = (logits.reshape(bw // nw, nw, h, n, n) + mask[None, :, None]).reshape(bw, h, n, n)
    out = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(bw, n, d)
    return self.proj(out)


class SwinBlock(nn.Module):
  """Swin block: (shifted) window attention and MLP, each pre-norm and residual."""

  def __init__(self, dim, num_heads, window, shift, resolution, mlp_ratio=4.0):
    super().__init__()
    from nio_jax.models.swin import shifted_window_mask

    if resolution <= window:
      window, shift = resolution, 0
    self.window, self.shift = window, shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, num_heads, window)
    self.norm2 = nn.LayerNorm(dim)
    self.fc1 = vit_linear(dim, int(dim * mlp_ratio))
    self.fc2 = vit_linear(int(dim * mlp_ratio), dim)
    mask = (
      torch.from_numpy(shifted_window_mask(resolution, resolution, window, shift))
      if shift
      else None
    )
    self.register_buffer("mask", mask, persistent=False)

  def forward(self, x):  # (B, H, W, C)
    b, hh, ww, c = x.shape
    w, s = self.window, self.shift
    y = self.norm1(x)
    if s:
      y = torch.roll(y, (-s, -s), (1, 2))
    y = y.reshape(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
    y = self.attn(y, self.mask)
    y = y.reshape(b, hh // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
    if s:
      y = torch.roll(y, (s, s), (1, 2))
    x = x + y
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchMerging(nn.Module):
  """Swin patch merging: 2x2 neighbouring tokens concatenated, normalised, projected."""

  def __init__(self, dim):
    super().__init__()
    self.norm = nn.LayerNorm(4 * dim)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    nn.init.normal_(self.reduction.weight, 0, 0.02)

  def forward(self, x):
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x))


class Swin(nn.Module):
  """Swin Transformer (`nio_jax.models.Swin`)."""

  def __init__(
    self,
    num_classes=10,
    patch_size=2,
    embed_dim=48,
    depths=(2, 2, 2),
    num_heads=(3, 6, 12),
    window=4,
    mlp_ratio=4.0,
    image_size=32,
    in_channels=3,
  ):
    super().__init__()
    self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
    self.patch_norm = nn.LayerNorm(embed_dim)
    self.seq = []
    dim, res = embed_dim, image_size // patch_size
    for s, (depth, heads) in enumerate(zip(depths, num_heads)):
      if s > 0:
        setattr(self, f"merge{s}", PatchMerging(dim))
        self.seq.append(f"merge{s}")
        dim, res = 2 * dim, res // 2
      for i in range(depth):
        setattr(
          self,
          f"stage{s + 1}_layer{i}",
          SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, res, mlp_ratio),
        )
        self.seq.append(f"stage{s + 1}_layer{i}")
    self.norm = nn.LayerNorm(dim)
    self.head = vit_linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
    x = run_blocks(self, self.seq, x)
    return self.head(self.norm(x).mean((1, 2)))
