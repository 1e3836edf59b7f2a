"""Shared building blocks of the model zoo: PyTorch-compatible initialisers, conv/BN helpers and
the scanned <-> unrolled parameter conversion.

Conventions used by every model in `nio_jax.models`:

* Inputs are NHWC; every model returns logits and has `__call__(self, x, train: bool = False)`.
* Batch-norm statistics live in the `batch_stats` collection (`use_running_average=not train`).
* Deep stacks of identical blocks are built with `nn.scan`.  A group of blocks named
  `<prefix>_block0 .. <prefix>_block{n-1}` in the unrolled model (`scan=False`) becomes
  `<prefix>_block0` (kept unrolled; it is usually the down-sampling block) plus one scanned
  module `<prefix>_scan` holding blocks 1..n-1 with a leading axis of length n-1 on every leaf.
  `unstack_blocks` / `stack_blocks` convert between the two layouts (for any
  collection: `params`, `batch_stats`, ...).  The core's `init_scales` recognises scanned
  leaves with the regex `(^|_)scan$` on any path key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers as jinit

# --------------------------------------------------------------------------------------------
# Initialisers (named after the PyTorch call they reproduce).
# Flax kernels are HWIO / (in, out); JAX's variance_scaling computes fan_in = H*W*I and
# fan_out = H*W*O, identical to torch's _calculate_fan_in_and_fan_out on OIHW / (out, in).
# NB: in jax>=0.10 variance_scaling's "normal" is untruncated (like torch's kaiming_normal_);
# "truncated_normal" is the truncated one.
# --------------------------------------------------------------------------------------------

#: `torch.nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`: N(0, 2/fan_out).
he_normal_fan_out = jinit.variance_scaling(2.0, "fan_out", "normal")

#: PyTorch's default Conv/Linear weight init, `kaiming_uniform_(w, a=sqrt(5))`:
#: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = jinit.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

zeros = jinit.zeros
ones = jinit.ones


def torch_default_bias(fan_in: int):
  """PyTorch's default Conv/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal_init(std: float):
  """`torch.nn.init.normal_(w, 0, std)` (untruncated)."""

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def he_normal_fan_out_scaled(multiplier: float):
  """`kaiming_normal_(fan_out)` with its std multiplied by `multiplier` (Fixup)."""
  return jinit.variance_scaling(2.0 * multiplier**2, "fan_out", "normal")


# --------------------------------------------------------------------------------------------
# Layer helpers
# --------------------------------------------------------------------------------------------


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  padding: int | None = None,
  *,
  bias: bool = False,
  kernel_init=he_normal_fan_out,
  bias_init=zeros,
  name: str | None = None,
  dtype: Any = None,
) -> nn.Conv:
  """A square conv with PyTorch-style symmetric explicit padding (default `kernel // 2`).

  Flax's `'SAME'` pads asymmetrically for stride 2, which would not match PyTorch.
  """
  p = kernel // 2 if padding is None else padding
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((p, p), (p, p)),
    use_bias=bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    name=name,
  )


def batch_norm(train: bool, name: str | None = None, *, momentum: float = 0.9, dtype: Any = None):
  """BatchNorm equivalent to `torch.nn.BatchNorm2d(eps=1e-5, momentum=1-momentum)`.

  Flax `momentum` is the decay of the running average (torch momentum 0.1 <=> flax 0.9).
  One documented difference: torch updates `running_var` with the *unbiased* batch
  variance, Flax with the biased one; normalisation itself is identical.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=momentum,
    epsilon=1e-5,
    use_fast_variance=False,
    dtype=dtype,
    name=name,
  )


def patch_embed(features: int, patch_size: int, in_channels: int, *, dtype: Any = None) -> nn.Conv:
  """The ViT / Swin patch embedding `patch_embed`: a `patch_size` x `patch_size` conv with
  that stride and PyTorch's default init (`nn.Conv2d`: bias bound from
  `fan_in = patch_size**2 * in_channels`)."""
  p = patch_size
  return nn.Conv(
    features,
    (p, p),
    strides=(p, p),
    padding="VALID",
    kernel_init=torch_default_kernel,
    bias_init=torch_default_bias(p * p * in_channels),
    dtype=dtype,
    name="patch_embed",
  )


def check_norm(norm: str) -> bool:
  """Checks a model's `norm` (`"bn"` or `"none"`); returns whether it uses batch norm.

  Raises:
    ValueError: any other value.
  """
  if norm not in ("bn", "none"):
    raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
  return norm == "bn"


def maybe_batch_norm(
  x: jax.Array, use_bn: bool, train: bool, name: str, *, momentum: float = 0.9, dtype: Any = None
) -> jax.Array:
  """`batch_norm(train, name)(x)` when `use_bn`, else `x` unchanged: the optional BN of
  the models with `norm="bn" | "none"`. Call it inside a compact `__call__`: the BN module
  (and its `name`) belongs to the calling module."""
  if not use_bn:
    return x
  return batch_norm(train, name, momentum=momentum, dtype=dtype)(x)


def bn_relu_pool(
  x: jax.Array, use_bn: bool, train: bool, name: str, *, momentum: float = 0.9, dtype: Any = None
) -> jax.Array:
  """The pre-activation models' head before the classifier: optional final BN `name`
  (`maybe_batch_norm`), ReLU, global average pooling `[N, H, W, C] -> [N, C]`."""
  x = maybe_batch_norm(x, use_bn, train, name, momentum=momentum, dtype=dtype)
  return jnp.mean(nn.relu(x), axis=(1, 2))


def blocks_per_stage_6n4(depth: int, model: str) -> int:
  """`n` of a three-stage model of depth `6n + 4` (DenseNet-BC, WRN).

  Raises:
    ValueError: naming `model`, when `depth` is not `6n + 4`.
  """
  if (depth - 4) % 6 != 0:
    raise ValueError(f"{model} depth must be 6n+4, got {depth}")
  return (depth - 4) // 6


def zero_pad_channels(x: jax.Array, features: int) -> jax.Array:
  """Option-A shortcut padding: append zero channels up to `features`."""
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f"cannot zero-pad {x.shape[-1]} channels down to {features}")
  if extra == 0:
    return x
  return jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (extra,), x.dtype)], axis=-1)


# The most scanned blocks that `scan_unroll=None` unrolls on XLA:CPU: every registry default
# (ResNet-110's stage tails of 17 blocks, ViT-B's 11, ResNet-50's 5) but not ResNet-1202's
# 199, whose unrolled compile is tens of minutes on CPU (`benchmarks/compile_time.py`).
CPU_UNROLL_MAX = 32


def resolve_unroll(unroll: int | bool | None, length: int, backend: str | None = None) -> int:
  """`nn.scan`'s `unroll` for a scan over `length` blocks.

  Args:
    unroll: a model's `scan_unroll`. `None` (the default): the whole scan on XLA:CPU when
      `length <= CPU_UNROLL_MAX`, else 1. On XLA:CPU a convolution inside the scan's while
      loop runs many times slower than the same convolution in straight-line code (a plain
      `jax.jit(jax.grad(loss))` step of the scanned ResNet-20: 36x PyTorch, unrolled 2x;
      issue 20, `benchmarks/user_loop.py`), while an unrolled scan keeps the stacked
      parameter layout. On accelerators the rolled loop (1) keeps compile time flat in
      depth. `True`: the whole scan. An int >= 1: that many blocks per loop iteration.
    length: the number of scanned blocks.
    backend: the backend to resolve for (default `jax.default_backend()`).

  Raises:
    ValueError: `unroll` is not None, a bool or an int >= 1.
  """
  if unroll is None:
    backend = backend or jax.default_backend()
    return length if backend == "cpu" and length <= CPU_UNROLL_MAX else 1
  if unroll is True:
    return length
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ValueError(f"scan_unroll must be None, True or an int >= 1, got {unroll!r}")
  return min(unroll, length)


def scan_blocks(block_cls, length: int, *, unroll: int | bool | None = None, **kwargs):
  """`nn.scan` over `length` identical blocks whose `__call__(x) -> (x, None)`.

  `params` and `batch_stats` get a leading block axis; RNGs are split per block. `unroll`
  (`resolve_unroll`) changes only the compiled loop, never the parameter layout or values.
  """
  return nn.scan(
    block_cls,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True, "dropout": True},
    length=length,
    unroll=resolve_unroll(unroll, length),
  )(**kwargs)


def stack_tail(
  block_cls, n: int, prefix: str, x, *, scan: bool, unroll: int | bool | None = None, **kwargs
):
  """Apply blocks 1..n-1 of a group (block0 is built by the caller, it usually differs):
  one scanned `<prefix>_scan` (`scan=True`, unrolled per `resolve_unroll(unroll, n - 1)`) or
  `<prefix>_block1 .. <prefix>_block{n-1}`.

  Must be called from inside a compact method. `block_cls(**kwargs)(x) -> (x, None)`.
  """
  if n <= 1:
    return x
  if scan:
    x, _ = scan_blocks(block_cls, n - 1, unroll=unroll, **kwargs, name=f"{prefix}_scan")(x)
  else:
    for i in range(1, n):
      x, _ = block_cls(**kwargs, name=f"{prefix}_block{i}")(x)
  return x


# --------------------------------------------------------------------------------------------
# scanned <-> unrolled parameter conversion
# --------------------------------------------------------------------------------------------

_SCAN_RE = re.compile(r"^(.*)_scan$")
_BLOCK_RE = re.compile(r"^(.*)_block(\d+)$")


def _first_leaf(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("empty scanned sub-tree")
  return leaves[0]


def unstack_blocks(tree: Any) -> Any:
  """Scanned layout -> unrolled layout.

  Every key `<prefix>_scan` (with leading axis k) is replaced by `<prefix>_block{o}` ..
  `<prefix>_block{o+k-1}`, where `o` is the number of `<prefix>_block*` keys already
  present at that level (1 for all models of this package). Works on a whole variables dict
  or on one collection; non-mapping leaves are returned as they are.
  """
  if not isinstance(tree, Mapping):
    return tree
  out: dict = {}
  for key, value in tree.items():
    m = _SCAN_RE.match(str(key))
    if m and isinstance(value, Mapping):
      prefix = m.group(1)
      offset = sum(
        1 for k in tree if (mb := _BLOCK_RE.match(str(k))) is not None and mb.group(1) == prefix
      )
      k = _first_leaf(value).shape[0]
      for i in range(k):
        sub = jax.tree_util.tree_map(lambda a, i=i: a[i], value)
        out[f"{prefix}_block{offset + i}"] = unstack_blocks(sub)
    else:
      out[key] = unstack_blocks(value)
  return out


def stack_blocks(tree: Any, num_unscanned: int = 1) -> Any:
  """Unrolled layout -> scanned layout (inverse of `unstack_blocks`).

  For every group `<prefix>_block0 .. <prefix>_block{n-1}` with `n > num_unscanned`,
  blocks `>= num_unscanned` are stacked into `<prefix>_scan`.
  """
  if not isinstance(tree, Mapping):
    return tree
  groups: dict[str, dict[int, Any]] = {}
  out: dict = {}
  for key, value in tree.items():
    m = _BLOCK_RE.match(str(key))
    if m and isinstance(value, Mapping):
      groups.setdefault(m.group(1), {})[int(m.group(2))] = stack_blocks(value, num_unscanned)
    else:
      out[key] = stack_blocks(value, num_unscanned)
  for prefix, blocks in groups.items():
    idx = sorted(blocks)
    if idx != list(range(len(idx))):
      raise ValueError(f"non-contiguous blocks for {prefix!r}: {idx}")
    for i in idx[:num_unscanned]:
      out[f"{prefix}_block{i}"] = blocks[i]
    rest = [blocks[i] for i in idx[num_unscanned:]]
    if rest:
      out[f"{prefix}_scan"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *rest)
  return out


def block_layout(tree: Any) -> str | None:
  """`"scanned"` when a nested mapping holds a `<prefix>_scan` key, else `"unrolled"`
  when it holds a `<prefix>_block<i>` key, else None (a model without block stacks)."""
  found: set[str] = set()

  def walk(t):
    if isinstance(t, Mapping):
      for k, v in t.items():
        if _SCAN_RE.match(str(k)):
          found.add("scanned")
        elif _BLOCK_RE.match(str(k)):
          found.add("unrolled")
        walk(v)

  walk(tree)
  return "scanned" if "scanned" in found else "unrolled" if found else None


def count_params(params: Any) -> int:
  """Number of scalar entries in a pytree of arrays or `ShapeDtypeStruct`s."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _structure(tree) -> Any:
  return jax.tree_util.tree_structure(tree)


def match_layout(tree: Any, like: Any) -> Any:
  """`tree` converted to the block layout of `like` (scanned `<prefix>_scan` or
  unrolled `<prefix>_block{i}`), for loading saved params, `batch_stats`, checkpoints or
  scales into a model built with the other `scan` setting.

  Args:
    tree: a nested mapping (variables, one collection, or a scales tree).
    like: a nested mapping in the wanted layout (e.g. `model.init(...)` or
      `jax.eval_shape` of it); only its keys are used.

  Returns:
    `tree` itself when its structure already equals `like`'s, else its
    `unstack_blocks` or `stack_blocks` conversion.

  Raises:
    ValueError: when neither layout of `tree` has the structure of `like`.
  """
  want = _structure(like)
  if _structure(tree) == want:
    return tree
  for convert in (unstack_blocks, stack_blocks, lambda t: stack_blocks(unstack_blocks(t))):
    try:
      out = convert(tree)
    except (ValueError, IndexError):
      continue
    if _structure(out) == want:
      return out
  raise ValueError(
    "saved tree does not match the model in either block layout (scanned '*_scan' or "
    f"unrolled '*_block<i>'): saved top-level keys {sorted(map(str, tree))}, "
    f"model's {sorted(map(str, like))}"
  )
