"""PyTorch twins of the convolutional networks of `nio_jax.models`: the CIFAR ResNets (BN, no
norm, Fixup), VGG, DenseNet-BC, Wide ResNet and the ImageNet ResNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nio_jax.bench.torch_baseline.layers import (
  bn_relu_pool,
  conv,
  flatten_nhwc,
  he_fan_out,
  init_conv_bn,
  pad_channels,
  run_blocks,
  zero,
)

# ------------------------------------------------------------------------------------------
# CIFAR ResNet
# ------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  """Basic residual block of the CIFAR ResNet (`nio_jax.models.BasicBlock`)."""

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
    return F.relu(out + pad_channels(sc, self.features))


class FixupBasicBlock(nn.Module):
  """Fixup residual block: scalar biases and a multiplier, no normalisation
  (`nio_jax.models.FixupBasicBlock`)."""

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
      he_fan_out(self.conv1.weight, float(num_branches) ** -0.5)
      zero(self.conv2.weight)
    else:
      he_fan_out(self.conv1.weight)
      he_fan_out(self.conv2.weight)

  def forward(self, x):
    xb = x + self.bias1a
    out = F.relu(self.conv1(xb) + self.bias1b)
    out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
    sc = x
    if self.stride != 1:
      sc = xb[:, :, :: self.stride, :: self.stride]
    return F.relu(out + pad_channels(sc, self.features))


class CifarResNet(nn.Module):
  """CIFAR ResNet-{20,...,1202}: BN, no norm or Fixup (`nio_jax.models.CifarResNet`)."""

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
    init_conv_bn(self, skip_conv=lambda name: fixup and "_block" in name)
    zero(self.fc.bias)
    if fixup and fixup_rescale:
      zero(self.fc.weight)

  def forward(self, x):
    x = self.conv1(x)
    if self.use_bn:
      x = self.bn1(x)
    if self.fixup:
      x = x + self.bias1
    x = F.relu(x)
    x = run_blocks(self, self.blocks, x).mean((2, 3))
    if self.fixup:
      x = x + self.bias2
    return self.fc(x)


# ------------------------------------------------------------------------------------------
# VGG
# ------------------------------------------------------------------------------------------


class VGG(nn.Module):
  """VGG with or without BN, the GradInit reference's init (`nio_jax.models.VGG`)."""

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
        he_fan_out(m.weight)
        zero(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        zero(m.bias)

  def forward(self, x):
    for name in self.layers:
      if name == "M":
        x = F.max_pool2d(x, 2, 2)
      elif name == "R":
        x = F.relu(x)
      else:
        x = getattr(self, name)(x)
    return self.classifier(flatten_nhwc(x))


# ------------------------------------------------------------------------------------------
# DenseNet-BC
# ------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
  """DenseNet-BC bottleneck layer: its output is concatenated to its input."""

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
  """DenseNet transition: (BN,) ReLU, 1x1 conv and 2x2 average pooling."""

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
  """DenseNet-BC for CIFAR (`nio_jax.models.DenseNet`)."""

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
    init_conv_bn(self)
    zero(self.classifier.bias)

  def forward(self, x):
    x = run_blocks(self, self.seq, self.conv0(x))
    return self.classifier(bn_relu_pool(x, self.norm_final if self.use_bn else None))


# ------------------------------------------------------------------------------------------
# Wide ResNet
# ------------------------------------------------------------------------------------------


class WideBasic(nn.Module):
  """Wide ResNet block: (BN,) ReLU, conv, dropout, (BN,) ReLU, conv, plus a shortcut."""

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
  """Wide ResNet WRN-depth-widen (`nio_jax.models.WideResNet`)."""

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
        zero(m.bias)

  def forward(self, x):
    x = run_blocks(self, self.blocks, self.conv1(x))
    return self.linear(bn_relu_pool(x, self.bn_final if self.use_bn else None))


# ------------------------------------------------------------------------------------------
# ImageNet ResNet
# ------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
  """ImageNet ResNet bottleneck block (1x1, 3x3, 1x1 convs with BN)."""

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
  """ImageNet ResNet with bottleneck blocks, e.g. ResNet-50
  (`nio_jax.models.ResNetImageNet`)."""

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
    init_conv_bn(self)  # (its convs have no bias)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    return self.fc(run_blocks(self, self.blocks, x).mean((2, 3)))
