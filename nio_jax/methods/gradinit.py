"""GradInit (Zhu et al., 2021): learn per-tensor scales so that one optimiser step helps most.

Released-code semantics (zhuchen03/gradinit, `gradinit_utils.gradinit`), with
`θ = apply_scales(θ0, s)` and `L(X; θ)` the mean loss over the batch X:

  * S = B0 ∪ B1 (one batch of this iterable: first half B0, second half B1);
    `g = ∇θ L(S; θ)` over every leaf (or the leaves `grad_filter` keeps).
  * SGD variant: `gn = ‖g‖₂`, direction `dir = g/‖g‖₂` (`normalize_grad=True`, as in every
    CIFAR recipe; `False` gives `dir = g`). Adam variant: `gn = ‖g‖₁`, `dir = sign(g)`.
  * If `gn > γ`: constraint step, minimise `gn` (second order: through the gradient).
  * Else objective step: minimise `L(S̃; θ − η·dir) / η` with `dir` held constant
    (`stop_gradient`), where the look-ahead batch S̃ is (`lookahead`):
      - "half" (CIFAR code, default): S̃ = B0 ∪ B2, B2 = the first half of the *next* batch
        of the iterable. The reference draws B0, B1, B2 as three consecutive loader batches of
        half size, so B2 is fresh data never seen in S; here each step consumes two batches
        of the iterable (the second half of the second one is unused) and B2 is likewise fresh.
      - "disjoint" (reference flag `--batch-no-overlap`): S̃ = the whole next batch.
      - "thirds" (fairseq/IWSLT code, `get_intersecting_samples`): one batch per step with
        n = ⌊B/3⌋, S = batch[:2n], S̃ = batch[n:] (they share the middle third).
  * The scales are updated with the same RescaleAdam as NIO (`nio_jax.rescale_adam`:
    clip ±`grad_clip`, Adam with split first moments / shared second moment, lower bound
    `min_scale` for weights and `min_scale_bias` for biases, zero-norm leaves skipped);
    `layernorm_max_scale` additionally caps layer-norm weight scales (IWSLT recipe: 100).
    Which leaves are biases and layer-norm weights is decided by structure in
    `nio_jax.leaves` (`ScaleSpec.kinds`; linen and NNX alike).

Everything per step is one jitted function (`make_gradinit_step`); only the chosen branch's
gradient is evaluated (`lax.cond`). The look-ahead loss is also recorded on constraint steps
(forward only) so the history has it every step.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nio_jax import checks, formulation, leaves, method_config
from nio_jax import scales as scmod
from nio_jax.errors import user_stacklevel
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
VARIANTS = ("sgd", "adam")
LOOKAHEADS = ("half", "disjoint", "thirds")

# CIFAR-10 recipes: launch/run_gradinit*.sh (η = 0.1, γ = 1, normalised gradient, min scale
# 0.01, clip 1; `batch_size` = S, i.e. 2 × the reference's loader batch). Transformer:
# fairseq/gradinit/launch/run_iwslt_14_gradinit_no_clipping.sh (Adam variant, --gradinit-grad-
# clip 1e8 i.e. no clipping, betas (0.9, 0.98), layer-norm scales capped at 100; batches are
# token-bounded (max_tokens 4096), so no batch size; S/S̃ are overlapping thirds).
_CIFAR = dict(
  variant="sgd",
  eta=0.1,
  gamma=1.0,
  normalize_grad=True,
  min_scale=0.01,
  grad_clip=1.0,
  lookahead="half",
)
GRADINIT_RECIPES: dict[str, dict[str, Any]] = {
  "vgg19": dict(_CIFAR, lr=1e-2, num_steps=390, batch_size=128),
  "vgg19_bn": dict(_CIFAR, lr=1e-1, num_steps=390, batch_size=128),
  "resnet110": dict(_CIFAR, lr=5e-2, num_steps=390, batch_size=128),
  "resnet110_bn": dict(_CIFAR, lr=1e-3, num_steps=390, batch_size=128),
  "densenet100": dict(_CIFAR, lr=5e-3, num_steps=780, batch_size=64),
  "densenet100_bn": dict(_CIFAR, lr=1e-2, num_steps=780, batch_size=64),
  "wrn28_10": dict(_CIFAR, lr=3e-3, num_steps=780, batch_size=64),
  "transformer": dict(
    variant="adam",
    eta=1e-3,
    gamma=1000.0,
    lr=2.5e-3,
    b1=0.9,
    b2=0.98,
    num_steps=780,
    min_scale=0.01,
    grad_clip=1e8,
    layernorm_max_scale=100.0,
    lookahead="thirds",
    batch_size=None,
  ),
}


@dataclasses.dataclass(frozen=True)
class GradInitConfig:
  """GradInit hyper-parameters. Defaults: the CIFAR-10 setting of the released code
  (η = 0.1, γ = 1, 390 iterations, S = 128, SGD variant with normalised gradient) with the
  code's default scale learning rate τ = 1e-3 (also the ResNet-110-BN recipe). Per-model
  recipes: `GradInitConfig.create("vgg19")` etc., see `GRADINIT_RECIPES`.

  Attributes:
    variant: "sgd" (gn = ‖g‖₂, dir = g/‖g‖₂) or "adam" (gn = ‖g‖₁, dir = sign(g)).
    num_steps: GradInit iterations.
    eta: η, the step size of the simulated first optimiser step.
    gamma: γ, the bound on the gradient norm (constraint step above it).
    lr: τ, learning rate of the scales (RescaleAdam).
    normalize_grad: SGD variant only: step along g/‖g‖₂ (True, all recipes) or g.
    lookahead: how S̃ is formed: "half", "disjoint" or "thirds" (module docstring).
    batch_size: the recipe's batch size |S| (informational; a different batch size warns).
    min_scale / min_scale_bias: lower bounds of weight / bias scales.
    layernorm_max_scale: upper bound of layer-norm weight scales (None = no bound).
    grad_clip: clip of each scale's gradient (0 disables).
    b1, b2, eps: Adam constants.
    grad_filter: predicate `(path, leaf) -> bool` for the leaves whose gradient enters
      gn and the look-ahead step; None = every leaf (released code);
      `nio_jax.default_grad_filter` = NIO's conv/dense/layer-norm leaves, by structure.
    select: predicate for the leaves whose scales are tuned; None = all non-zero leaves.
    device_loop: run all steps in one compiled `lax.scan` over batches stacked beforehand
      (no host round-trip per step; see `nio_jax.search.run_scale_search(on_device=...)`).
    conv: how the step evaluates convolutions (`nio_jax.formulation.CONVS`): "auto" = the
      backend's default (`formulation.resolve_conv`: im2col on CPU), "none" as written.
  """

  variant: str = "sgd"
  num_steps: int = 390
  eta: float = 0.1
  gamma: float = 1.0
  lr: float = 1e-3
  normalize_grad: bool = True
  lookahead: str = "half"
  batch_size: int | None = 128
  min_scale: float = 0.01
  min_scale_bias: float = 0.0
  layernorm_max_scale: float | None = None
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_filter: Callable | None = None
  select: Callable | None = None
  device_loop: bool = False
  conv: str = "auto"

  @classmethod
  def create(cls, config=None, **overrides) -> GradInitConfig:
    """From None (defaults), a GradInitConfig, a dict, a ConfigDict or a recipe name."""
    cfg = cls(**method_config.config_values(cls, config, overrides, "GradInit", GRADINIT_RECIPES))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises `TypeError` / `ValueError` naming a bad field."""
    checks.check_choice("variant", self.variant, VARIANTS)
    checks.check_choice("lookahead", self.lookahead, LOOKAHEADS)
    formulation.resolve_conv(self.conv)
    method_config.check_int("num_steps", self.num_steps, 1, " (GradInit iterations)")
    checks.check_positive("eta", self.eta)
    checks.check_positive("gamma", self.gamma)
    checks.check_positive("lr", self.lr)
    checks.check_positive("min_scale", self.min_scale, allow_zero=True)
    checks.check_positive("min_scale_bias", self.min_scale_bias, allow_zero=True)
    checks.check_positive("grad_clip", self.grad_clip, allow_zero=True)
    checks.check_positive("eps", self.eps, allow_zero=True)
    method_config.check_betas(self.b1, self.b2)
    if not isinstance(self.normalize_grad, bool):
      raise TypeError(f"normalize_grad must be a bool, got {self.normalize_grad!r}.")
    if self.layernorm_max_scale is not None:
      checks.check_positive("layernorm_max_scale", self.layernorm_max_scale)
      if self.layernorm_max_scale < self.min_scale:
        raise ValueError(
          f"layernorm_max_scale={self.layernorm_max_scale} is below min_scale={self.min_scale}."
        )
    if self.batch_size is not None:
      method_config.check_int("batch_size", self.batch_size, 2)
    for name in ("grad_filter", "select"):
      v = getattr(self, name)
      if v is not None and not callable(v):
        raise TypeError(f"{name} must be None or a predicate (path, leaf) -> bool, got {v!r}.")

  @property
  def batches_per_step(self) -> int:
    """Batches of the iterable one step consumes: 1 with `lookahead="thirds"`, else 2."""
    return 1 if self.lookahead == "thirds" else 2

  def to_dict(self) -> dict:
    """The fields as a plain dict (predicates by name)."""
    return method_config.to_plain_dict(self)


def _batches_per_step(cfg) -> int:
  """The registry's `batches_per_step` of GradInit: 2, 1 with `lookahead="thirds"`."""
  return cfg.batches_per_step if isinstance(cfg, GradInitConfig) else 2


def lookahead_batches(
  batch: PyTree, next_batch: PyTree | None, lookahead: str
) -> tuple[PyTree, PyTree]:
  """(S, S̃) from one step's batches (see the module docstring)."""
  b = checks.batch_size(batch)
  if lookahead == "thirds":
    n = b // 3
    return (
      jax.tree_util.tree_map(lambda x: x[: 2 * n], batch),
      jax.tree_util.tree_map(lambda x: x[n:], batch),
    )
  if next_batch is None:
    raise ValueError(f"lookahead={lookahead!r} needs the next batch.")
  if lookahead == "disjoint":
    return batch, next_batch
  h = b // 2
  return batch, jax.tree_util.tree_map(
    lambda x, y: jnp.concatenate([x[:h], y[:h]], axis=0), batch, next_batch
  )


def gradient_norm_and_direction(g: PyTree, variant: str, normalize_grad: bool = True):
  """(gn, dir): (‖g‖₂, g/‖g‖₂ or g) for "sgd", (‖g‖₁, sign(g)) for "adam"."""
  flat = jax.tree_util.tree_leaves(g)
  if variant == "adam":
    gn = sum(jnp.sum(jnp.abs(x)) for x in flat)
    return gn, jax.tree_util.tree_map(jnp.sign, g)
  gn = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in flat))
  if normalize_grad:
    return gn, jax.tree_util.tree_map(lambda x: x / gn, g)
  return gn, g


def _project_max(max_scale: PyTree) -> optax.GradientTransformation:
  """`u ← min(s + u, max_scale) − s` (applied after RescaleAdam's lower bound)."""

  def update_fn(updates, state, params=None):
    return (
      jax.tree_util.tree_map(
        lambda u, s, hi: jnp.minimum(s + u, hi) - s, updates, params, max_scale
      ),
      state,
    )

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _make_tx(cfg: GradInitConfig, spec: scmod.ScaleSpec):
  tx = rescale_adam(cfg.lr, spec, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, grad_clip=cfg.grad_clip)
  if cfg.layernorm_max_scale is None:
    return tx
  if spec.kinds is None:
    raise ValueError(
      "layernorm_max_scale needs to know the layer-norm leaves: build the ScaleSpec with "
      "nio_jax.init_scales(params, kinds=...), which records them in spec.kinds."
    )
  hi = jax.tree_util.tree_map_with_path(
    lambda p, m: jnp.full(
      jnp.shape(m),
      cfg.layernorm_max_scale if spec.kinds.is_layer_norm_scale(p) else jnp.inf,
      jnp.float32,
    ),
    spec.min_scale,
  )
  return optax.chain(tx, _project_max(hi))


def _scale_grad(loss_fn, cfg: GradInitConfig, params0, scales, s_batch, t_batch):
  eta, gamma = cfg.eta, cfg.gamma
  grad_filter = leaves.resolve_grad_filter(cfg.grad_filter, loss_fn, params0)
  mask = method_config.static_mask(params0, grad_filter)

  def mean_loss(params, batch):
    return jnp.mean(loss_fn(params, batch))

  def gn_fn(sc):
    params = scmod.apply_scales(params0, sc)
    loss, g = jax.value_and_grad(mean_loss)(params, s_batch)
    g = jax.tree_util.tree_map(lambda x, m: x if m else jnp.zeros_like(x), g, mask)
    gn, direction = gradient_norm_and_direction(g, cfg.variant, cfg.normalize_grad)
    return gn, (jax.lax.stop_gradient(direction), loss)

  gn, vjp_fn, (direction, loss) = jax.vjp(gn_fn, scales, has_aux=True)

  def lookahead(sc):
    params = scmod.apply_scales(params0, sc)
    stepped = jax.tree_util.tree_map(
      lambda p, d: (p - eta * d).astype(jnp.result_type(p)), params, direction
    )
    la = mean_loss(stepped, t_batch)
    return la / eta, la

  def constraint_branch(_):
    (grads,) = vjp_fn(jnp.ones_like(gn))
    obj, la = lookahead(scales)
    return grads, obj, la

  def objective_branch(_):
    (obj, la), grads = jax.value_and_grad(lookahead, has_aux=True)(scales)
    return grads, obj, la

  constraint = gn > gamma
  grads, obj, la = jax.lax.cond(constraint, constraint_branch, objective_branch, None)
  metrics = dict(grad_norm=gn, loss=loss, lookahead_loss=la, objective=obj, constraint=constraint)
  return grads, metrics


# Compiled GradInit steps, keyed on (loss_fn, the step-relevant config).
_STEPS = StepCache("gradinit", maxsize=32)


def _gradinit_update(loss_fn, cfg, spec, params0, scales, opt_state, batch, next_batch):
  s_batch, t_batch = lookahead_batches(batch, next_batch, cfg.lookahead)
  grads, metrics = _scale_grad(loss_fn, cfg, params0, scales, s_batch, t_batch)
  updates, opt_state = _make_tx(cfg, spec).update(
    grads, opt_state, scales, is_constraint=metrics["constraint"]
  )
  new_scales = jax.tree_util.tree_map(lambda s, u: s + u, scales, updates)
  return new_scales, opt_state, metrics


def _gradinit_step(loss_fn, cfg, *args):
  return conv_step(_gradinit_update, loss_fn, cfg, *args)


def make_gradinit_step(loss_fn: Callable, spec: scmod.ScaleSpec, config=None):
  """The GradInit `SearchStep`: `init(scales)`, `step`, `tx` (the scale optimiser) and
  `grad_fn` (`scale_grad`).

  `step(params0, scales, opt_state, batch[, next_batch]) -> (scales, opt_state, metrics)`
  (`next_batch` unless `lookahead="thirds"`); metrics: `grad_norm` (gn on S), `loss` (L(S)),
  `lookahead_loss` (L(S̃; θ − η·dir)), `objective` (lookahead_loss/η), `constraint`.
  The step is one jitted function, cached on (`loss_fn`, the step-relevant config), so
  repeated searches with the same loss function and shapes compile once.
  `scale_grad(params0, scales, S, S_tilde) -> (grads, metrics)` is the (un-jitted) gradient
  w.r.t. the scales of the branch that runs, i.e. what the optimiser receives.
  """
  cfg = GradInitConfig.create(config)
  key = dataclasses.replace(cfg, num_steps=1, batch_size=None)  # what the step depends on
  jitted = _STEPS.get(
    (loss_fn, key), lambda: jax.jit(functools.partial(_gradinit_step, loss_fn, key))
  )

  def step(params0, scales, opt_state, batch, next_batch=None):
    return jitted(spec, params0, scales, opt_state, batch, next_batch)

  tx = _make_tx(cfg, spec)
  grad_fn = functools.partial(_scale_grad, loss_fn, cfg)
  return SearchStep(init=tx.init, step=step, tx=tx, grad_fn=grad_fn)


@register(
  "gradinit",
  config_cls=GradInitConfig,
  label="GradInit",
  batches_per_step=_batches_per_step,
  recipes=GRADINIT_RECIPES,
  searches=True,
)
def gradinit(
  loss_fn: Callable,
  params: PyTree,
  batches: Iterable,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """Runs GradInit and returns the initialised params.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses (batch-norm models: training
      mode with the statistics update discarded, see `nio_jax.flax_utils`; dropout off).
    params: initial parameters θ0.
    batches: iterable of batches of size |S| (a list is cycled, an iterator must supply
      `num_steps × config.batches_per_step` batches). With the default `lookahead="half"`
      each step takes two consecutive batches: S = the first, B2 = the first half of the
      second.
    config: None (defaults), `GradInitConfig`, dict, ConfigDict or a recipe name from
      `GRADINIT_RECIPES` (e.g. "resnet110_bn").
    progress: tqdm progress bar.
    mesh: optional `jax.sharding.Mesh` with a `data` axis (`nio_jax.distributed.make_mesh()`):
      each batch is sharded over it, params/scales are replicated and `jit` partitions the
      step (data parallel; equal to one device to float tolerance).

  Returns:
    `InitResult(params=apply_scales(θ0, scales), scales, history)`; history per step:
    `grad_norm`, `loss`, `lookahead_loss`, `objective`, `constraint`.

  Raises:
    ValueError / TypeError on bad input; `NonFiniteError` (with `.last_good`) if a value
    becomes NaN/inf.
  """
  cfg = GradInitConfig.create(config)
  minimum = 3 if cfg.lookahead == "thirds" else 2

  def check_size(b):
    if cfg.lookahead == "half" and b % 2:
      raise ValueError(
        f"GradInit splits each batch into two halves; the batch size {b} is odd. "
        "Use an even batch size."
      )
    if cfg.batch_size is not None and b != cfg.batch_size:
      warnings.warn(
        f"GradInit config expects batches of {cfg.batch_size} examples (|S|), got "
        f"{b}; set batch_size=None to silence this.",
        stacklevel=user_stacklevel(),  # the user's call, also through methods.initialize
      )

  _, batches = check_search_inputs(
    loss_fn, params, batches, minimum=minimum, check_size=check_size, mesh=mesh
  )
  scales, spec = init_search_scales(loss_fn, params, cfg, select=cfg.select)
  search = make_gradinit_step(loss_fn, spec, cfg)
  (params, scales), batches = shard_search(mesh, (params, scales), batches)
  return run_scale_search(
    search.step,
    params,
    scales,
    search.init(scales),
    batches,
    num_steps=cfg.num_steps,
    method="gradinit",
    config=cfg.to_dict(),
    per_step=cfg.batches_per_step,
    show_progress=progress,
    min_batch=minimum,
    postfix=("objective", "grad_norm"),
    on_device=cfg.device_loop,
  )


ADAM_DEFAULTS = dict(GRADINIT_RECIPES["transformer"])


@dataclasses.dataclass(frozen=True)
class GradInitAdamConfig(GradInitConfig):
  """`GradInitConfig` of method "gradinit_adam": `create` starts from the only published
  Adam recipe (IWSLT'14 Transformer, `ADAM_DEFAULTS`) instead of the SGD defaults, and
  requires `variant="adam"`."""

  @classmethod
  def create(cls, config=None, **overrides) -> GradInitAdamConfig:
    """From None (the Adam recipe), a GradInitConfig, a dict / ConfigDict of overrides of
    the Adam recipe, or a recipe name."""
    if isinstance(config, GradInitConfig) or isinstance(config, str):
      values = method_config.config_values(
        GradInitConfig, config, overrides, "GradInit", GRADINIT_RECIPES
      )
    else:
      values = {
        **ADAM_DEFAULTS,
        **method_config.config_values(cls, config, overrides, "GradInit", GRADINIT_RECIPES),
      }
    cfg = cls(**values)
    cfg.validate()
    if cfg.variant != "adam":
      raise ValueError(
        f"method 'gradinit_adam' got variant={cfg.variant!r}; use method "
        "'gradinit' for the SGD variant."
      )
    return cfg


@register(
  "gradinit_adam",
  config_cls=GradInitAdamConfig,
  label="GradInit (Adam)",
  batches_per_step=_batches_per_step,
  recipes=GRADINIT_RECIPES,
  searches=True,
)
def gradinit_adam(
  loss_fn: Callable,
  params: PyTree,
  batches: Iterable,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """GradInit's Adam variant (`GradInitAdamConfig`: defaults are the only published Adam
  recipe, IWSLT'14 Transformer, `GRADINIT_RECIPES["transformer"]`; a dict config overrides
  those values)."""
  cfg = GradInitAdamConfig.create(config)
  res = gradinit(loss_fn, params, batches, GradInitConfig.create(cfg), progress=progress, mesh=mesh)
  return dataclasses.replace(res, method="gradinit_adam")
