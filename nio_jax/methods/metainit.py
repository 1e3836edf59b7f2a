"""MetaInit (Dauphin & Schoenholz, 2019): tune weight norms to minimise the gradient quotient.

With `g = ∇θ L` and the Hessian-vector product `Hg = ∇θ(½‖g‖²)` (computed by
forward-over-reverse autodiff, `jax.jvp` of `jax.grad`; no finite differences):

    GQ = (1/N) Σ_k |(g_k − Hg_k) / (g_k + ε·sign(g_k)) − 1|,   ε = 1e-5,

with `sign(0) = +1` and the sign held constant (as in the paper and the GradInit authors'
code), N = the number of parameter entries that enter GQ (every leaf by default).

Variants (`MetaInitConfig.variant`):
  * "sign_momentum" (the paper's listing, default): only leaves with ≥ 2 dimensions (per
    block for `nn.scan` stacks) and non-zero norm are tuned; per leaf
    `d = sign(<θ_l, ∇θ_l GQ>/‖θ_l‖)`, `m ← momentum·m − lr·d`, `θ_l ← θ_l·(‖θ_l‖ + m)/‖θ_l‖`;
    lr = 0.1, momentum 0.9, 500 steps. This is done on the scales `θ = apply_scales(θ0, s)`
    (`<θ_l, ∇θ_l GQ> = s_l·∂GQ/∂s_l`), so the result also reports `scales` = final/initial
    norm per leaf.
  * "rescale_adam" (the GradInit authors' MetaInit baseline, `gradinit_utils.metainit`):
    the scales of every non-zero leaf follow `nio_jax.rescale_adam` (objective steps only)
    on GQ, lr default 1e-3 (their `--gradinit-lr` default), min scale 0.01, clip 1, and
    391 steps: their `metainit` makes one pass over its loader, CIFAR-10's 50,000 training
    images at the default batch 128 (⌈50000/128⌉ = 391). For other data use ⌈N/B⌉.

Data: the paper uses random Gaussian inputs with random labels; pass a shape spec such as
`{"image": (B, H, W, C), "num_classes": 10}` (every tuple entry becomes a N(0, 1) input of
that shape, `num_classes` gives integer labels under `label_key`, default "label"); step t
draws its batch from `fold_in(PRNGKey(seed), t)`, so runs are reproducible. Or pass an
iterable of real batches (the GradInit authors' baseline ran on CIFAR batches).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, formulation, leaves, method_config
from nio_jax import scales as scmod
from nio_jax.methods.registry import register
from nio_jax.rescale_adam import rescale_adam
from nio_jax.results import InitResult
from nio_jax.search import (
  SearchStep,
  check_search_inputs,
  conv_step,
  init_search_scales,
  run_scale_search,
  shard_search,
)
from nio_jax.step_cache import StepCache

PyTree = Any
VARIANTS = ("sign_momentum", "rescale_adam")
_DEFAULT_LR = {"sign_momentum": 0.1, "rescale_adam": 1e-3}
# sign_momentum: the paper's 500 steps. rescale_adam: the GradInit authors' `metainit` runs
# one pass over its loader (train_cifar.py, zhuchen03/gradinit at 777c407: CIFAR-10 train,
# batch = `--batchsize` 128 for every model, since the per-architecture batch sizes there
# test arch names that no longer exist), ⌈50000/128⌉ = 391 steps.
_DEFAULT_STEPS = {"sign_momentum": 500, "rescale_adam": 391}


@dataclasses.dataclass(frozen=True)
class MetaInitConfig:
  """MetaInit hyper-parameters; defaults are the paper's (lr 0.1, momentum 0.9, 500 steps).

  Attributes:
    variant: "sign_momentum" (paper) or "rescale_adam" (GradInit authors' baseline).
    num_steps: iterations; None = 500 for sign_momentum (paper), 391 for rescale_adam (one
      pass of the authors' CIFAR-10 loader at batch 128; use ⌈N/B⌉ for other data).
    lr: learning rate; None = 0.1 for sign_momentum, 1e-3 for rescale_adam.
    momentum: sign_momentum only.
    eps: ε of the gradient quotient.
    seed: PRNG seed of the random batches (shape-spec data only).
    min_scale / min_scale_bias / grad_clip / b1 / b2 / adam_eps: rescale_adam only.
    grad_filter: predicate `(path, leaf) -> bool` for the leaves that enter GQ (its N, g and
      the Hessian block); None = every leaf (paper); `nio_jax.default_grad_filter` = NIO's
      conv/dense/layer-norm leaves, by structure (`nio_jax.leaves`).
    select: predicate for the leaves that are tuned; None = the variant's rule (≥ 2-dim
      leaves for sign_momentum, all non-zero leaves for rescale_adam). Zero-norm leaves are
      never tuned.
    device_loop: run all steps in one compiled `lax.scan` over batches stacked beforehand
      (no host round-trip per step; see `nio_jax.search.run_scale_search(on_device=...)`).
    conv: how the step evaluates convolutions (`nio_jax.formulation.CONVS`): "auto" = the
      backend's default (`formulation.resolve_conv`: im2col on CPU), "none" as written.
    hvp: how `gradient_quotient` forms g and Hg (`HVPS`): "jvp" = `jax.jvp` of `jax.grad`
      beside a separate `value_and_grad` (the forward-backward written twice), "linearize" = one
      `jax.linearize` of `value_and_grad` (the forward-backward once, its tangent map
      applied to g), "vjp" = one `jax.vjp` of `value_and_grad`, Hg as its pullback of g
      (reverse over reverse, as the PyTorch reference). The same Hg (H is symmetric) to
      float rounding; they differ in speed only.
  """

  variant: str = "sign_momentum"
  num_steps: int | None = None
  lr: float | None = None
  momentum: float = 0.9
  eps: float = 1e-5
  seed: int = 0
  min_scale: float = 0.01
  min_scale_bias: float = 0.0
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  grad_filter: Callable | None = None
  select: Callable | None = None
  device_loop: bool = False
  conv: str = "auto"
  hvp: str = "jvp"

  def __post_init__(self):
    if self.num_steps is None and self.variant in _DEFAULT_STEPS:
      object.__setattr__(self, "num_steps", _DEFAULT_STEPS[self.variant])

  @classmethod
  def create(cls, config=None, **overrides) -> MetaInitConfig:
    """From None (defaults), a MetaInitConfig, a dict or an ml_collections ConfigDict."""
    cfg = cls(**method_config.config_values(cls, config, overrides, "MetaInit"))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises `TypeError` / `ValueError` naming a bad field."""
    checks.check_choice("variant", self.variant, VARIANTS)
    formulation.resolve_conv(self.conv)
    checks.check_choice("hvp", self.hvp, HVPS)
    method_config.check_int("num_steps", self.num_steps, 1, " (MetaInit iterations)")
    if self.lr is not None:
      checks.check_positive("lr", self.lr)
    checks.check_positive("momentum", self.momentum, allow_zero=True)
    if self.momentum >= 1:
      raise ValueError(f"momentum={self.momentum} must be < 1.")
    checks.check_positive("eps", self.eps)
    method_config.check_int("seed", self.seed, 0)
    checks.check_positive("min_scale", self.min_scale, allow_zero=True)
    checks.check_positive("min_scale_bias", self.min_scale_bias, allow_zero=True)
    checks.check_positive("grad_clip", self.grad_clip, allow_zero=True)
    checks.check_positive("adam_eps", self.adam_eps, allow_zero=True)
    method_config.check_betas(self.b1, self.b2)
    for name in ("grad_filter", "select"):
      v = getattr(self, name)
      if v is not None and not callable(v):
        raise TypeError(f"{name} must be None or a predicate (path, leaf) -> bool, got {v!r}.")

  @property
  def learning_rate(self) -> float:
    """`lr`, or the variant's default when None."""
    return _DEFAULT_LR[self.variant] if self.lr is None else float(self.lr)

  def to_dict(self) -> dict:
    """The fields as a plain dict (predicates by name, `lr` resolved)."""
    d = method_config.to_plain_dict(self)
    d["lr"] = self.learning_rate
    return d


# ------------------------------------------------------------------ gradient quotient


def hessian_vector_product(loss_fn: Callable, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
  """`H v` with H the Hessian of the mean loss at `params` (forward-over-reverse)."""
  grad_fn = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))
  return jax.jvp(grad_fn, (params,), (v,))[1]


HVPS = ("jvp", "linearize", "vjp")


def grad_and_hvp(mean_loss: Callable, params: PyTree, mask: PyTree, hvp: str = "jvp"):
  """`(loss, g, Hg)`: the mean loss, its gradient with the leaves outside `mask` zeroed, and
  the Hessian times that masked g, formed as `hvp` says (`HVPS`; `MetaInitConfig.hvp`).
  Differentiable in `params` in every form."""

  def masked(g):
    return jax.tree_util.tree_map(lambda x, m: x if m else jnp.zeros_like(x), g, mask)

  if hvp == "jvp":
    loss, g = jax.value_and_grad(mean_loss)(params)
    g = masked(g)
    return loss, g, jax.jvp(jax.grad(mean_loss), (params,), (g,))[1]
  if hvp == "linearize":
    (loss, g), lin = jax.linearize(jax.value_and_grad(mean_loss), params)
    g = masked(g)
    return loss, g, lin(g)[1]
  if hvp == "vjp":
    (loss, g), pullback = jax.vjp(jax.value_and_grad(mean_loss), params)
    g = masked(g)
    return loss, g, pullback((jnp.zeros_like(loss), g))[0]
  raise ValueError(f"hvp={hvp!r}; choose one of {HVPS}.")


def gradient_quotient(
  loss_fn: Callable,
  params: PyTree,
  batch: PyTree,
  *,
  eps: float = 1e-5,
  grad_filter: Callable | None = None,
  hvp: str = "jvp",
):
  """`(GQ, aux)` at `params` on `batch`; aux = dict(loss, grad_norm=‖g‖₂). Differentiable.

  `hvp` picks how g and Hg are formed (`grad_and_hvp`); every choice gives the same GQ to
  float rounding."""
  grad_filter = leaves.resolve_grad_filter(grad_filter, loss_fn, params)
  mask = method_config.static_mask(params, grad_filter)
  n = sum(
    int(np.size(x))
    for x, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask))
    if m
  )
  if n == 0:
    raise ValueError("grad_filter rejects every leaf: the gradient quotient needs at least one.")

  def mean_loss(p):
    return jnp.mean(loss_fn(p, batch))

  loss, g, hg = grad_and_hvp(mean_loss, params, mask, hvp)
  total = 0.0
  for gl, hl, m in zip(
    jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(hg), jax.tree_util.tree_leaves(mask)
  ):
    if not m:
      continue
    gl = gl.astype(jnp.float32)
    sign = jax.lax.stop_gradient(jnp.where(gl >= 0, 1.0, -1.0))
    total = total + jnp.sum(jnp.abs((gl - hl.astype(jnp.float32)) / (gl + eps * sign) - 1.0))
  gn = jnp.sqrt(
    sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(g))
  )
  return total / n, dict(loss=loss, grad_norm=gn)


# ------------------------------------------------------------------ random data


def is_shape_spec(data) -> bool:
  """True for a MetaInit random-input spec such as `{"image": (B, H, W, C), "num_classes": 10}`."""
  if not isinstance(data, Mapping) or not data:
    return False
  has_shape = False
  for k, v in data.items():
    if isinstance(v, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in v):
      has_shape = True
    elif k in ("num_classes", "label_key") and isinstance(v, (int, str)):
      continue
    else:
      return False
  return has_shape


def _parse_spec(spec: Mapping):
  shapes = {
    k: tuple(int(d) for d in v) for k, v in spec.items() if k not in ("num_classes", "label_key")
  }
  sizes = {s[0] if s else None for s in shapes.values()}
  if None in sizes or any(d <= 0 for s in shapes.values() for d in s):
    raise ValueError(
      f"shape spec {spec!r}: every shape needs a leading batch axis and positive sizes."
    )
  if len(sizes) != 1:
    raise ValueError(f"shape spec {spec!r}: the shapes disagree on the batch size.")
  b = sizes.pop()
  if b < 2:
    raise ValueError(f"shape spec {spec!r}: batch size {b} < 2.")
  num_classes = spec.get("num_classes")
  if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
    raise ValueError(f"num_classes={num_classes!r} must be an int >= 1.")
  label_key = spec.get("label_key", "label")
  if num_classes is not None and label_key in shapes:
    raise ValueError(f"shape spec has both a shape and labels under {label_key!r}.")
  return shapes, num_classes, label_key, b


def random_batch(spec: Mapping, key: jax.Array) -> dict:
  """One batch from a shape spec: N(0, 1) float32 inputs, uniform integer labels."""
  shapes, num_classes, label_key, b = _parse_spec(spec)
  keys = jax.random.split(key, len(shapes) + 1)
  out = {
    k: jax.random.normal(kk, s, jnp.float32)
    for (k, s), kk in zip(sorted(shapes.items()), keys[:-1])
  }
  if num_classes is not None:
    out[label_key] = jax.random.randint(keys[-1], (b,), 0, int(num_classes), jnp.int32)
  return out


def random_batches(spec: Mapping, seed: int, num_steps: int):
  """Generator of `num_steps` batches; batch t uses `fold_in(PRNGKey(seed), t)`."""
  _parse_spec(spec)
  base = jax.random.PRNGKey(seed)
  for t in range(num_steps):
    yield random_batch(spec, jax.random.fold_in(base, t))


# ------------------------------------------------------------------ steps


class MomentumState(NamedTuple):
  """Optimiser state of the sign-momentum variant: one momentum per scale."""

  momentum: PyTree


def metainit_select(path, leaf) -> bool:
  """The paper's rule: tensors with at least 2 dimensions (per block for scanned stacks)."""
  ndim = jnp.ndim(leaf) - (1 if leaves.is_stacked(path) and jnp.ndim(leaf) >= 1 else 0)
  return ndim >= 2


def _gq_of_scales(loss_fn, cfg, scales, params0, batch):
  return gradient_quotient(
    loss_fn,
    scmod.apply_scales(params0, scales),
    batch,
    eps=cfg.eps,
    grad_filter=cfg.grad_filter,
    hvp=cfg.hvp,
  )


def _make_tx(cfg: MetaInitConfig, spec: scmod.ScaleSpec):
  return rescale_adam(
    cfg.learning_rate, spec, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, grad_clip=cfg.grad_clip
  )


# Compiled MetaInit steps, keyed on (loss_fn, the step-relevant config).
_STEPS = StepCache("metainit", maxsize=32)


def _metainit_step(loss_fn, cfg, *args):
  return conv_step(_metainit_update, loss_fn, cfg, *args)


def _metainit_update(loss_fn, cfg, spec, params0, scales, state, batch):
  (gq, aux), grads = jax.value_and_grad(_gq_of_scales, argnums=2, has_aux=True)(
    loss_fn, cfg, scales, params0, batch
  )
  metrics = dict(gq=gq, **aux)
  if cfg.variant == "rescale_adam":
    updates, state = _make_tx(cfg, spec).update(grads, state, scales, is_constraint=False)
    return jax.tree_util.tree_map(lambda s, u: s + u, scales, updates), state, metrics

  lr, mom = cfg.learning_rate, cfg.momentum
  norms0 = jax.tree_util.tree_map_with_path(scmod.leaf_norms, params0)

  def one(s, g, m, n0, t):
    d = jnp.sign(s * g)  # sign(<θ_l, ∇θ_l GQ> / ‖θ_l‖)
    m_new = mom * m - lr * d
    norm = jnp.abs(s) * n0
    s_new = s * (norm + m_new) / jnp.where(t, norm, 1.0)
    return jnp.where(t, s_new, s), jnp.where(t, m_new, m)

  out = jax.tree_util.tree_map(one, scales, grads, state.momentum, norms0, spec.trainable)
  is_pair = lambda x: isinstance(x, tuple)
  new = jax.tree_util.tree_map(lambda o: o[0], out, is_leaf=is_pair)
  m = jax.tree_util.tree_map(lambda o: o[1], out, is_leaf=is_pair)
  return new, MomentumState(m), metrics


def make_metainit_step(loss_fn: Callable, spec: scmod.ScaleSpec, config=None):
  """The MetaInit `SearchStep`: `step(params0, scales, state, batch) -> (scales, state,
  metrics)`, one jitted function (cached on `loss_fn` and the step-relevant config); metrics:
  `gq`, `loss`, `grad_norm` (‖g‖₂, before the update). `init(scales)` is the optimiser state
  (`tx`, the scale optimiser, is None for the sign-momentum variant).
  """
  cfg = MetaInitConfig.create(config)
  key = dataclasses.replace(cfg, num_steps=1, seed=0)  # what the step depends on
  jitted = _STEPS.get(
    (loss_fn, key), lambda: jax.jit(functools.partial(_metainit_step, loss_fn, key))
  )

  def step(params0, scales, state, batch):
    return jitted(spec, params0, scales, state, batch)

  if cfg.variant == "rescale_adam":
    tx = _make_tx(cfg, spec)
    return SearchStep(init=tx.init, step=step, tx=tx)
  return SearchStep(
    init=lambda scales: MomentumState(jax.tree_util.tree_map(jnp.zeros_like, scales)), step=step
  )


@register(
  "metainit",
  config_cls=MetaInitConfig,
  label="MetaInit",
  data=("real", "random"),
  seeded=("random",),  # the run's seed draws the Gaussian inputs
  searches=True,
)
def metainit(
  loss_fn: Callable,
  params: PyTree,
  batches_or_shape: Any,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """Runs MetaInit and returns the initialised params.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: initial parameters θ0.
    batches_or_shape: a random-input shape spec (e.g. `{"image": (B, 32, 32, 3),
      "num_classes": 10}`; a fresh Gaussian batch per step from `config.seed`), or an
      iterable of real batches (a list is cycled).
    config: None (paper defaults), `MetaInitConfig`, dict or ConfigDict.
    progress: tqdm progress bar.
    mesh: optional `jax.sharding.Mesh` with a `data` axis: batches (real or random) are
      sharded over it and params/scales replicated (data parallel, GSPMD).

  Returns:
    `InitResult(params, scales, history)` with `params = apply_scales(θ0, scales)`, scales =
    final/initial norm per tuned leaf (1 elsewhere); history per step: `gq`, `loss`,
    `grad_norm`.
  """
  cfg = MetaInitConfig.create(config)
  data, first = batches_or_shape, None
  if is_shape_spec(batches_or_shape):
    checks.check_params(params)  # before the spec is read, as for real batches
    data = random_batches(batches_or_shape, cfg.seed, cfg.num_steps)
    first = random_batch(batches_or_shape, jax.random.PRNGKey(cfg.seed))
  _, data = check_search_inputs(loss_fn, params, data, first=first, mesh=mesh)
  select = cfg.select
  if select is None and cfg.variant == "sign_momentum":
    select = metainit_select
  scales, spec = init_search_scales(loss_fn, params, cfg, select=select)
  search = make_metainit_step(loss_fn, spec, cfg)
  state = search.init(scales)
  (params, scales, state), data = shard_search(mesh, (params, scales, state), data)
  return run_scale_search(
    search.step,
    params,
    scales,
    state,
    data,
    num_steps=cfg.num_steps,
    method="metainit",
    config=cfg.to_dict(),
    show_progress=progress,
    postfix=("gq", "grad_norm"),
    on_device=cfg.device_loop,
  )
