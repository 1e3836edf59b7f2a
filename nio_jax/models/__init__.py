"""Flax (linen) model zoo of nio_jax, with a name registry.

>>> from nio_jax import models
>>> model = models.get("resnet110", norm="none")          # a flax.linen.Module
>>> variables = model.init(rng, x, train=False)          # x: NHWC
>>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

Every model: `__call__(x, train: bool = False)` -> logits; BN statistics in `batch_stats`;
dropout off. See `docs/models.md` for the init variant of each model and parameter counts.
Scanned blocks live in modules named `*_scan` (leading block axis on every leaf); use
`unstack_blocks` / `stack_blocks` to convert to/from the `scan=False` layout, and
`match_layout` to load a saved tree into a model of either layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from ._common import block_layout, count_params, match_layout, stack_blocks, unstack_blocks
from .cifar_resnet import (
  CIFAR_RESNET_DEPTHS,
  BasicBlock,
  CifarResNet,
  FixupBasicBlock,
  fixup_multiplier,
)
from .densenet import DenseNet
from .resnet_imagenet import Bottleneck, ResNetImageNet
from .small import MLP, SmallCNN
from .swin import Swin
from .vgg import VGG
from .vit import ViT
from .wide_resnet import WideResNet

_CIFAR = (32, 32, 3)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], tuple[int, int, int]]] = {}


def _register(name, ctor, defaults, input_shape=_CIFAR):
  _REGISTRY[name] = (ctor, dict(defaults), tuple(input_shape))


for _d in CIFAR_RESNET_DEPTHS:
  _register(f"resnet{_d}", CifarResNet, dict(depth=_d))
_register("vgg19", VGG, dict(cfg="vgg19", norm="none"))
_register("vgg19_bn", VGG, dict(cfg="vgg19", norm="bn"))
_register("densenet100", DenseNet, dict(depth=100, growth_rate=12))
_register("wrn28_10", WideResNet, dict(depth=28, widen=10))
_register("resnet50", ResNetImageNet, dict(layers=(3, 4, 6, 3)), (224, 224, 3))
_register(
  "vit_tiny", ViT, dict(patch_size=4, dim=192, depth=12, num_heads=3, mlp_ratio=4.0, pool="cls")
)
_register(
  "vit_mini", ViT, dict(patch_size=4, dim=128, depth=6, num_heads=4, mlp_ratio=2.0, pool="gap")
)
_register(
  "swin_mini",
  Swin,
  dict(patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), window=4),
)
_register("mlp", MLP, dict(hidden=(256, 256)), (28, 28, 1))
_register("cnn_small", SmallCNN, dict(channels=(32, 64), hidden=128), (28, 28, 1))


def names() -> list[str]:
  """Registered model names, in registration order."""
  return list(_REGISTRY)


def registry_entry(name: str) -> tuple[Callable[..., nn.Module], dict[str, Any], tuple]:
  """`(constructor, default kwargs, input shape)` of a registered model (e.g. for the
  PyTorch twins of `nio_jax.bench`).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
  ctor, defaults, shape = _REGISTRY[name]
  return ctor, dict(defaults), shape


def get(name: str, **kwargs) -> nn.Module:
  """Build a registered model; `kwargs` override its defaults (e.g. `num_classes=100`,
  `norm="none"`, `variant="fixup"`, `scan=False`, `width=...`)."""
  ctor, defaults, _ = registry_entry(name)
  return ctor(**{**defaults, **kwargs})


def input_shape(name: str) -> tuple[int, int, int]:
  """Default (H, W, C) input of a registered model (CIFAR 32x32x3, ImageNet 224x224x3,
  Fashion-MNIST 28x28x1); the models accept other sizes where the architecture allows."""
  return registry_entry(name)[2]


__all__ = [
  "get",
  "registry_entry",
  "names",
  "input_shape",
  "count_params",
  "stack_blocks",
  "unstack_blocks",
  "block_layout",
  "match_layout",
  "fixup_multiplier",
  "CifarResNet",
  "BasicBlock",
  "FixupBasicBlock",
  "VGG",
  "DenseNet",
  "WideResNet",
  "ResNetImageNet",
  "Bottleneck",
  "ViT",
  "Swin",
  "MLP",
  "SmallCNN",
]
