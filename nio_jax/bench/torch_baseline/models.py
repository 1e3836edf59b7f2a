"""PyTorch twins of the ``nio_jax.models`` zoo (same structure, same module names, same init
rules), plus :func:`load_flax_variables` that copies Flax params / batch_stats into them.

Module attribute names equal the Flax module names of the *unrolled* (``scan=False``) layout,
so the loader is generic: a Flax path ``a/b/kernel`` becomes the torch key ``a.b.weight``
(conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in); BN ``scale``/``bias``/``mean``/
``var`` -> ``weight``/``bias``/``running_mean``/``running_var``). Scanned blocks are unstacked
first. Inputs are NCHW; flattening before a linear layer is done in NHWC order to match Flax.

Build by registry name with :func:`get` (same names and kwargs as ``nio_jax.models.get``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------
# init helpers (mirroring nio_jax.models._common)
# ------------------------------------------------------------------------------------------


def _he_fan_out(w, multiplier=1.0):
  nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
  if multiplier != 1.0:
    with torch.no_grad():
      w.mul_(multiplier)


def _zero(t):
  if t is not None:
    nn.init.zeros_(t)


def _init_conv_bn(model: nn.Module, skip_conv=None):
  """The GradInit reference's init of the CNNs: conv weights He fan-out normal with zero
  biases, BN weight 1 and bias 0 (module order, so the RNG draws are the reference's).
  `skip_conv(name)` True leaves that conv as it is (Fixup's branch convs)."""
  for name, m in model.named_modules():
    if isinstance(m, nn.Conv2d) and not (skip_conv is not None and skip_conv(name)):
      _he_fan_out(m.weight)
      _zero(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


def conv(cin, cout, k, stride=1, padding=None, bias=False):
  return nn.Conv2d(
    cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias
  )


def _pad_channels(x, features):
  extra = features - x.shape[1]
  if extra == 0:
    return x
  return torch.cat([x, x.new_zeros((x.shape[0], extra) + tuple(x.shape[2:]))], 1)


def _run_blocks(module: nn.Module, names, x):
  """Applies `module`'s sub-modules `names` to `x` in order (flat attribute names, so the
  state-dict keys match the Flax params)."""
  for name in names:
    x = getattr(module, name)(x)
  return x


def _bn_relu_pool(x, bn):
  """Optional final BN (`bn` None: none), ReLU and global average pooling of NCHW `x`."""
  if bn is not None:
    x = bn(x)
  return F.relu(x).mean((2, 3))


def _flatten_nhwc(x):
  return x.permute(0, 2, 3, 1).flatten(1)


# ------------------------------------------------------------------------------------------
# CIFAR ResNet
# ------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  def __init__(self, cin, features, stride=1, norm="bn"):
    super().__init__()
    use_bn = norm == "bn"
    self.use_bn, self.stride, self.features = use_bn, stride, features
    self.conv1 = conv(cin, features, 3, stride, bias=not use_bn)
    self.conv2 = conv(features, features, 3, 1, bias=not use_bn)
    if use_bn:
      self.bn1 = nn.BatchNorm2d(features)
      self.bn2 = nn.BatchNorm2d(features)
      if stride != 1:
        self.shortcut_bn = nn.BatchNorm2d(cin)

  def forward(self, x):
    out = self.conv1(x)
    if self.use_bn:
      out = self.bn1(out)
    out = self.conv2(F.relu(out))
    if self.use_bn:
      out = self.bn2(out)
    sc = x
    if self.stride != 1:
      sc = x[:, :, :: self.stride, :: self.stride]
      if self.use_bn:
        sc = self.shortcut_bn(sc)
    return F.relu(out + _pad_channels(sc, self.features))


class FixupBasicBlock(nn.Module):
  def __init__(self, cin, features, stride=1, num_branches=1, rescale=True):
    super().__init__()
    self.stride, self.features = stride, features
    self.bias1a = nn.Parameter(torch.zeros(1))
    self.conv1 = conv(cin, features, 3, stride)
    self.bias1b = nn.Parameter(torch.zeros(1))
    self.bias2a = nn.Parameter(torch.zeros(1))
    self.conv2 = conv(features, features, 3, 1)
    self.scale = nn.Parameter(torch.ones(1))
    self.bias2b = nn.Parameter(torch.zeros(1))
    if rescale:
      _he_fan_out(self.conv1.weight, float(num_branches) ** -0.5)
      _zero(self.conv2.weight)
    else:
      _he_fan_out(self.conv1.weight)
      _he_fan_out(self.conv2.weight)

  def forward(self, x):
    xb = x + self.bias1a
    out = F.relu(self.conv1(xb) + self.bias1b)
    out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
    sc = x
    if self.stride != 1:
      sc = xb[:, :, :: self.stride, :: self.stride]
    return F.relu(out + _pad_channels(sc, self.features))


class CifarResNet(nn.Module):
  def __init__(
    self,
    depth=20,
    num_classes=10,
    norm=None,
    variant="standard",
    width=16,
    fixup_rescale=True,
    scan=None,
    in_channels=3,
  ):
    super().__init__()
    n = (depth - 2) // 6
    fixup = variant == "fixup"
    norm = "none" if fixup else (norm or "bn")
    use_bn = norm == "bn"
    self.fixup, self.use_bn = fixup, use_bn
    self.conv1 = conv(in_channels, width, 3, bias=not use_bn and not fixup)
    if use_bn:
      self.bn1 = nn.BatchNorm2d(width)
    if fixup:
      self.bias1 = nn.Parameter(torch.zeros(1))
    cin = width
    self.blocks = []
    for s in range(3):
      feats = width * 2**s
      for i in range(n):
        stride = 2 if (s > 0 and i == 0) else 1
        if fixup:
          blk = FixupBasicBlock(cin, feats, stride, 3 * n, fixup_rescale)
        else:
          blk = BasicBlock(cin, feats, stride, norm)
        setattr(self, f"stage{s + 1}_block{i}", blk)
        self.blocks.append(f"stage{s + 1}_block{i}")
        cin = feats
    if fixup:
      self.bias2 = nn.Parameter(torch.zeros(1))
    self.fc = nn.Linear(cin, num_classes)
    # init (reference)
    _init_conv_bn(self, skip_conv=lambda name: fixup and "_block" in name)
    _zero(self.fc.bias)
    if fixup and fixup_rescale:
      _zero(self.fc.weight)

  def forward(self, x):
    x = self.conv1(x)
    if self.use_bn:
      x = self.bn1(x)
    if self.fixup:
      x = x + self.bias1
    x = F.relu(x)
    x = _run_blocks(self, self.blocks, x).mean((2, 3))
    if self.fixup:
      x = x + self.bias2
    return self.fc(x)


# ------------------------------------------------------------------------------------------
# VGG
# ------------------------------------------------------------------------------------------


class VGG(nn.Module):
  def __init__(self, cfg="vgg19", num_classes=10, norm="none", width_mult=1.0, in_channels=3):
    super().__init__()
    from nio_jax.models.vgg import vgg_channels

    self.layers = []
    cin, i = in_channels, 0
    for v in vgg_channels(cfg, width_mult):
      if v == "M":
        self.layers.append("M")
        continue
      setattr(self, f"conv{i}", conv(cin, v, 3, bias=True))
      self.layers.append(f"conv{i}")
      if norm == "bn":
        setattr(self, f"bn{i}", nn.BatchNorm2d(v))
        self.layers.append(f"bn{i}")
      self.layers.append("R")
      cin, i = v, i + 1
    self.classifier = nn.Linear(cin, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        _he_fan_out(m.weight)
        _zero(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        _zero(m.bias)

  def forward(self, x):
    for name in self.layers:
      if name == "M":
        x = F.max_pool2d(x, 2, 2)
      elif name == "R":
        x = F.relu(x)
      else:
        x = getattr(self, name)(x)
    return self.classifier(_flatten_nhwc(x))


# ------------------------------------------------------------------------------------------
# DenseNet-BC
# ------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
  def __init__(self, cin, growth, bn_size, use_bn):
    super().__init__()
    self.use_bn = use_bn
    if use_bn:
      self.norm1 = nn.BatchNorm2d(cin)
      self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.conv1 = conv(cin, bn_size * growth, 1, bias=not use_bn)
    self.conv2 = conv(bn_size * growth, growth, 3, bias=not use_bn)

  def forward(self, x):
    h = self.norm1(x) if self.use_bn else x
    h = self.conv1(F.relu(h))
    if self.use_bn:
      h = self.norm2(h)
    h = self.conv2(F.relu(h))
    return torch.cat([x, h], 1)


class Transition(nn.Module):
  def __init__(self, cin, cout, use_bn):
    super().__init__()
    self.use_bn = use_bn
    if use_bn:
      self.norm = nn.BatchNorm2d(cin)
    self.conv = conv(cin, cout, 1, bias=not use_bn)

  def forward(self, x):
    if self.use_bn:
      x = self.norm(x)
    return F.avg_pool2d(self.conv(F.relu(x)), 2, 2)


class DenseNet(nn.Module):
  def __init__(
    self,
    depth=100,
    growth_rate=12,
    num_classes=10,
    norm="bn",
    compression=0.5,
    bn_size=4,
    num_init_features=None,
    in_channels=3,
  ):
    super().__init__()
    n = (depth - 4) // 6
    use_bn = norm == "bn"
    self.use_bn = use_bn
    feats = num_init_features or 2 * growth_rate
    self.conv0 = conv(in_channels, feats, 3, bias=not use_bn)
    self.seq = []
    for b in range(3):
      for i in range(n):
        setattr(
          self,
          f"block{b + 1}_layer{i + 1}",
          DenseLayer(feats + i * growth_rate, growth_rate, bn_size, use_bn),
        )
        self.seq.append(f"block{b + 1}_layer{i + 1}")
      feats += n * growth_rate
      if b != 2:
        out = int(feats * compression)
        setattr(self, f"transition{b + 1}", Transition(feats, out, use_bn))
        self.seq.append(f"transition{b + 1}")
        feats = out
    if use_bn:
      self.norm_final = nn.BatchNorm2d(feats)
    self.classifier = nn.Linear(feats, num_classes)
    _init_conv_bn(self)
    _zero(self.classifier.bias)

  def forward(self, x):
    x = _run_blocks(self, self.seq, self.conv0(x))
    return self.classifier(_bn_relu_pool(x, self.norm_final if self.use_bn else None))


# ------------------------------------------------------------------------------------------
# Wide ResNet
# ------------------------------------------------------------------------------------------


class WideBasic(nn.Module):
  def __init__(self, cin, features, stride=1, norm="bn", dropout_rate=0.0):
    super().__init__()
    self.use_bn = norm == "bn"
    if self.use_bn:
      self.bn1 = nn.BatchNorm2d(cin)
      self.bn2 = nn.BatchNorm2d(features)
    self.conv1 = conv(cin, features, 3, 1, bias=True)
    self.dropout = nn.Dropout(dropout_rate)
    self.conv2 = conv(features, features, 3, stride, bias=True)
    if stride != 1 or cin != features:
      self.shortcut = conv(cin, features, 1, stride, bias=True)
    else:
      self.shortcut = None

  def forward(self, x):
    h = self.bn1(x) if self.use_bn else x
    h = self.dropout(self.conv1(F.relu(h)))
    if self.use_bn:
      h = self.bn2(h)
    h = self.conv2(F.relu(h))
    return h + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
  def __init__(
    self, depth=28, widen=10, num_classes=10, norm="bn", dropout_rate=0.0, scan=None, in_channels=3
  ):
    super().__init__()
    n = (depth - 4) // 6
    self.use_bn = norm == "bn"
    self.conv1 = conv(in_channels, 16, 3, bias=True)
    cin = 16
    self.blocks = []
    for s in range(3):
      feats = 16 * widen * 2**s
      for i in range(n):
        name = f"stage{s + 1}_block{i}"
        setattr(
          self, name, WideBasic(cin, feats, 2 if (s > 0 and i == 0) else 1, norm, dropout_rate)
        )
        self.blocks.append(name)
        cin = feats
    if self.use_bn:
      self.bn_final = nn.BatchNorm2d(cin, momentum=0.9)
    self.linear = nn.Linear(cin, num_classes)
    for m in self.modules():  # PyTorch default init, conv biases zeroed (GradInitConv2d)
      if isinstance(m, nn.Conv2d):
        _zero(m.bias)

  def forward(self, x):
    x = _run_blocks(self, self.blocks, self.conv1(x))
    return self.linear(_bn_relu_pool(x, self.bn_final if self.use_bn else None))


# ------------------------------------------------------------------------------------------
# ResNet-50
# ------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
  def __init__(self, cin, planes, stride=1, expansion=4):
    super().__init__()
    out = planes * expansion
    self.conv1 = conv(cin, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv(planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv(planes, out, 1)
    self.bn3 = nn.BatchNorm2d(out)
    if stride != 1 or cin != out:
      self.downsample_conv = conv(cin, out, 1, stride, padding=0)
      self.downsample_bn = nn.BatchNorm2d(out)
    else:
      self.downsample_conv = None

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = F.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    if self.downsample_conv is not None:
      x = self.downsample_bn(self.downsample_conv(x))
    return F.relu(h + x)


class ResNetImageNet(nn.Module):
  def __init__(self, layers=(3, 4, 6, 3), width=64, num_classes=1000, scan=None, in_channels=3):
    super().__init__()
    self.conv1 = conv(in_channels, width, 7, 2, padding=3)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    self.blocks = []
    for s, n in enumerate(layers):
      planes = width * 2**s
      for i in range(n):
        name = f"layer{s + 1}_block{i}"
        setattr(self, name, Bottleneck(cin, planes, 2 if (s > 0 and i == 0) else 1))
        self.blocks.append(name)
        cin = planes * 4
    self.fc = nn.Linear(cin, num_classes)
    _init_conv_bn(self)  # (its convs have no bias)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    return self.fc(_run_blocks(self, self.blocks, x).mean((2, 3)))


# ------------------------------------------------------------------------------------------
# ViT
# ------------------------------------------------------------------------------------------


def _vit_linear(i, o):
  lin = nn.Linear(i, o)
  nn.init.normal_(lin.weight, 0, 0.02)
  _zero(lin.bias)
  return lin


class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = _vit_linear(dim, 3 * dim)
    self.proj = _vit_linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = torch.einsum("bnhd,bmhd->bhnm", q, k) * (d // h) ** -0.5
    out = torch.einsum("bhnm,bmhd->bnhd", attn.softmax(-1), v).reshape(b, n, d)
    return self.proj(out)


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = _vit_linear(dim, hidden)
    self.fc2 = _vit_linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
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
    self.head = _vit_linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    if self.pool == "cls":
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
    x = x + self.pos_embed
    x = self.norm(_run_blocks(self, self.blocks, x))
    x = x[:, 0] if self.pool == "cls" else x.mean(1)
    return self.head(x)


# ------------------------------------------------------------------------------------------
# Swin (small)
# ------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
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
    self.qkv = _vit_linear(dim, 3 * dim)
    self.proj = _vit_linear(dim, dim)

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
  def __init__(self, dim, num_heads, window, shift, resolution, mlp_ratio=4.0):
    super().__init__()
    from nio_jax.models.swin import shifted_window_mask

    if resolution <= window:
      window, shift = resolution, 0
    self.window, self.shift = window, shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, num_heads, window)
    self.norm2 = nn.LayerNorm(dim)
    self.fc1 = _vit_linear(dim, int(dim * mlp_ratio))
    self.fc2 = _vit_linear(int(dim * mlp_ratio), dim)
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
  def __init__(self, dim):
    super().__init__()
    self.norm = nn.LayerNorm(4 * dim)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    nn.init.normal_(self.reduction.weight, 0, 0.02)

  def forward(self, x):
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x))


class Swin(nn.Module):
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
    self.head = _vit_linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
    x = _run_blocks(self, self.seq, x)
    return self.head(self.norm(x).mean((1, 2)))


# ------------------------------------------------------------------------------------------
# small models
# ------------------------------------------------------------------------------------------


class MLP(nn.Module):
  def __init__(self, hidden=(256, 256), num_classes=10, in_features=784):
    super().__init__()
    self.names = []
    cin = in_features
    for i, h in enumerate(hidden):
      setattr(self, f"dense{i}", nn.Linear(cin, h))
      self.names.append(f"dense{i}")
      cin = h
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = _flatten_nhwc(x) if x.dim() == 4 else x.flatten(1)
    for n in self.names:
      x = F.relu(getattr(self, n)(x))
    return self.head(x)


class SmallCNN(nn.Module):
  def __init__(self, channels=(32, 64), hidden=128, num_classes=10, in_channels=1, image_size=28):
    super().__init__()
    cin, size = in_channels, image_size
    self.convs = []
    for i, c in enumerate(channels):
      setattr(self, f"conv{i + 1}", conv(cin, c, 3, bias=True))
      self.convs.append(f"conv{i + 1}")
      cin, size = c, size // 2
    self.fc1 = nn.Linear(cin * size * size, hidden)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x):
    for n in self.convs:
      x = F.max_pool2d(F.relu(getattr(self, n)(x)), 2, 2)
    return self.head(F.relu(self.fc1(_flatten_nhwc(x))))


# ------------------------------------------------------------------------------------------
# registry (mirrors nio_jax.models) and the Flax -> torch loader
# ------------------------------------------------------------------------------------------

_CTORS = {
  "CifarResNet": CifarResNet,
  "VGG": VGG,
  "DenseNet": DenseNet,
  "WideResNet": WideResNet,
  "ResNetImageNet": ResNetImageNet,
  "ViT": ViT,
  "Swin": Swin,
  "MLP": MLP,
  "SmallCNN": SmallCNN,
}


def get(name: str, **kwargs) -> nn.Module:
  """Torch twin of ``nio_jax.models.get(name, **kwargs)`` (uses the Flax registry's defaults).

  Extra torch-only kwargs: ``in_channels`` (all but MLP), ``image_size`` (ViT, SmallCNN),
  ``in_features`` (MLP); ``image_size`` also for Swin; defaults follow ``nio_jax.models.input_shape(name)``.
  """
  from nio_jax import models as fm

  ctor, defaults, shape = fm.registry_entry(name)  # ValueError for unknown names
  cls = _CTORS[ctor.__name__]
  kw = {**defaults, **kwargs}
  kw.pop("dtype", None)
  if cls is MLP:
    kw.setdefault("in_features", math.prod(shape))
  else:
    kw.setdefault("in_channels", shape[2])
  if cls in (ViT, SmallCNN, Swin):
    kw.setdefault("image_size", shape[0])
  return cls(**kw)


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


_LEAF_ALIASES = {
  "kernel": "weight",
  "scale": "weight",
  "mean": "running_mean",
  "var": "running_var",
}


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def load_flax_variables(model: nn.Module, variables: Mapping, strict: bool = True) -> nn.Module:
  """Copy Flax ``{'params': ..., 'batch_stats': ...}`` into the torch twin ``model`` (in place).

  Scanned blocks are unstacked first; conv kernels HWIO -> OIHW, dense (in, out) -> (out, in).
  With ``strict``, every torch parameter/buffer (except ``num_batches_tracked``) must be set.
  """
  from nio_jax.models import unstack_blocks

  variables = unstack_blocks(dict(variables))
  sd = model.state_dict()
  new = {}
  for coll in ("params", "batch_stats"):
    for path, arr in _flatten(variables.get(coll, {})):
      mod, leaf = ".".join(path[:-1]), path[-1]
      key = None
      for cand in (leaf, _LEAF_ALIASES.get(leaf)):
        if cand is None:
          continue
        k = f"{mod}.{cand}" if mod else cand
        if k in sd:
          key = k
          break
      if key is None:
        raise KeyError(f"no torch tensor for Flax {coll}/{'/'.join(path)}")
      t = torch.from_numpy(np.array(arr, dtype=np.float32))
      if leaf == "kernel" and t.dim() == 4:
        t = t.permute(3, 2, 0, 1)
      elif leaf == "kernel" and t.dim() == 2:
        t = t.t()
      if tuple(t.shape) != tuple(sd[key].shape):
        raise ValueError(
          f"shape mismatch for {key}: flax {tuple(t.shape)} vs torch {tuple(sd[key].shape)}"
        )
      new[key] = t.contiguous()
  if strict:
    missing = [k for k in sd if k not in new and not k.endswith("num_batches_tracked")]
    if missing:
      raise KeyError(f"torch tensors not set from Flax variables: {missing}")
  model.load_state_dict(new, strict=False)
  return model
