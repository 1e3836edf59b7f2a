"""NIO: Neural Initialisation Optimisation by maximising GradCosine (Yang et al., 2022).

Each step, on a fresh batch, with `θ = apply_scales(θ0, s)`:
  * compute the D gradients (sub-batches, or examples when `num_chunks=None`) and
    `gn = mean_i ‖g_i‖`;
  * if `gn > γ`: constraint step, minimise `gn`;
  * else objective step, minimise `gc`: −GC, `gc_gn`: −GC − μ·Σ‖g_i‖²,
    `gc_gn_sqrt` (released default): −GC − μ·Σ‖g_i‖;
  * update `s` with `rescale_adam` (clip ±1, Adam with split first moments, lower bound).
Everything per-step is one jitted function (`make_nio_step`).

`nio(loss_fn, params, batches)` with no config runs the released ImageNet settings:
D = 4, r = 0.2, γ = 10, lr = 3e-3, 100 steps, objective `gc_gn_sqrt`, μ = 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, cosine, formulation, leaves, method_config
from nio_jax import scales as scmod
from nio_jax.formulation import Formulation
from nio_jax.methods.registry import register
from nio_jax.rescale_adam import rescale_adam
from nio_jax.results import InitResult
from nio_jax.search import (
  SearchStep,
  check_search_inputs,
  init_search_scales,
  run_scale_search,
  shard_search,
)
from nio_jax.step_cache import StepCache

PyTree = Any
OBJECTIVES = ("gc", "gc_gn", "gc_gn_sqrt")


@dataclasses.dataclass(frozen=True)
class NIOConfig:
  """NIO hyper-parameters. Defaults are the released ImageNet ResNet-50 run.

  Attributes:
    num_steps: search iterations (one fresh batch each).
    num_chunks: D sub-batches of the batch setting; None = sample-wise GradCosine.
    overlap: sub-batch overlap ratio r ∈ [0, 1).
    gamma: bound γ on the mean gradient norm (constraint step above it).
    lr: learning rate of the scales.
    objective: "gc", "gc_gn" or "gc_gn_sqrt".
    gn_mul: μ, weight of the gradient-norm term.
    min_scale / min_scale_bias: lower bounds of weight / bias scales.
    grad_clip: clip of each scale's gradient (0 disables).
    b1, b2, eps: Adam constants.
    pullback: how the D gradients are pulled back (`formulation.SAMPLE_PULLBACKS` /
      `SUBBATCH_PULLBACKS`); "auto" = the measured default of the backend, resolved for the
      loss when the step is traced (`formulation.resolve_formulation`).
    conv: how convolutions are evaluated (`formulation.CONVS`: "none", "slices",
      "im2col"); "auto" = the measured default of the backend.
    chunk_size: sample-wise only: examples processed at a time (memory bound).
    grad_filter: predicate `(path, leaf) -> bool` for the leaves whose gradients enter GC;
      "default" (or `nio_jax.default_grad_filter`) = the conv, dense and layer-norm leaves
      (released code), decided by structure (`nio_jax.leaves.LeafKinds.grad_filter`; batch
      norm is known from the Flax adapters, see `nio_jax.leaves`); None = every leaf.
    select: predicate for the leaves whose scales are tuned; None = all non-zero leaves.
    device_loop: run all steps in one compiled `lax.scan` over batches stacked beforehand
      (no host round-trip per step; see `nio_jax.search.run_scale_search(on_device=...)`).
  """

  num_steps: int = 100
  num_chunks: int | None = 4
  overlap: float = 0.2
  gamma: float = 10.0
  lr: float = 3e-3
  objective: str = "gc_gn_sqrt"
  gn_mul: float = 1.0
  min_scale: float = 0.01
  min_scale_bias: float = 0.0
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  pullback: str = "auto"
  conv: str = "auto"
  chunk_size: int | None = None
  grad_filter: Any = "default"
  select: Callable | None = None
  device_loop: bool = False

  @classmethod
  def create(cls, config=None, **overrides) -> NIOConfig:
    """From None (defaults), a NIOConfig, a dict or an ml_collections ConfigDict."""
    values = method_config.config_values(cls, config, overrides, "NIO")
    cfg = cls(**values)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises `ValueError` / `TypeError` naming the first bad field."""
    method_config.check_int("num_steps", self.num_steps, 1)
    checks.check_positive("gamma", self.gamma)
    checks.check_positive("lr", self.lr)
    checks.check_positive("gn_mul", self.gn_mul, allow_zero=True)
    checks.check_positive("grad_clip", self.grad_clip, allow_zero=True)
    checks.check_positive("min_scale", self.min_scale, allow_zero=True)
    checks.check_positive("min_scale_bias", self.min_scale_bias, allow_zero=True)
    checks.check_choice("objective", self.objective, OBJECTIVES)
    method_config.check_betas(self.b1, self.b2)
    checks.check_positive("eps", self.eps, allow_zero=True)
    checks.check_chunks(max(self.num_chunks or 2, 2), self.num_chunks, self.overlap)
    checks.check_optional_int("chunk_size", self.chunk_size)
    checks.check_predicate("grad_filter", self.grad_filter, allow=("default",))
    checks.check_predicate("select", self.select)
    formulation.check_formulation(self.num_chunks, self.pullback, self.conv)

  def grad_filter_for(self, loss_fn: Callable, params: PyTree):
    """The `wrt` predicate that `grad_filter` means for this loss and these params ("default"
    becomes the structural filter; see `nio_jax.leaves.resolve_grad_filter`)."""
    return leaves.resolve_grad_filter(self.grad_filter, loss_fn, params)

  def to_dict(self) -> dict:
    """The fields as a plain dict (predicates by name)."""
    return method_config.to_plain_dict(self)


def nio_objective(stats: cosine.GCStats, objective: str, gn_mul: float) -> jax.Array:
  """The quantity an objective step minimises (the negated GradCosine plus norm terms)."""
  if objective == "gc":
    return -stats.gc
  if objective == "gc_gn":
    return -stats.gc - gn_mul * jnp.sum(stats.grad_norms**2)
  if objective == "gc_gn_sqrt":
    return -stats.gc - gn_mul * jnp.sum(stats.grad_norms)
  raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}.")


def _search_loss(loss_fn, cfg: NIOConfig, form: Formulation, mesh, scales, params0, batch):
  wrt = cfg.grad_filter_for(loss_fn, params0)  # static: from the tree's paths and shapes
  params = scmod.apply_scales(params0, scales)
  if mesh is not None and cfg.num_chunks is None:
    stats = cosine.samplewise_stats(loss_fn, params, batch, mesh, form, wrt=wrt)
  else:
    stats = cosine.compute_stats(
      loss_fn, params, batch, form, num_chunks=cfg.num_chunks, overlap=cfg.overlap, wrt=wrt
    )
  gn = stats.grad_norm
  obj = nio_objective(stats, cfg.objective, cfg.gn_mul)
  constraint = jax.lax.stop_gradient(gn > cfg.gamma)
  return jnp.where(constraint, gn, obj), (stats, obj, constraint)


def _make_tx(cfg: NIOConfig, spec: scmod.ScaleSpec):
  return rescale_adam(cfg.lr, spec, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, grad_clip=cfg.grad_clip)


def _nio_update(
  loss_fn, cfg: NIOConfig, form: Formulation, mesh, tx, params0, scales, opt_state, batch
):
  grads, (stats, obj, constraint) = jax.grad(
    functools.partial(_search_loss, loss_fn, cfg, form, mesh), has_aux=True
  )(scales, params0, batch)
  updates, opt_state = tx.update(grads, opt_state, scales, is_constraint=constraint)
  new_scales = jax.tree_util.tree_map(lambda s, u: s + u, scales, updates)
  metrics = dict(
    gc=stats.gc,
    grad_norm=stats.grad_norm,
    grad_norms=stats.grad_norms,
    objective=obj,
    constraint=constraint,
    loss=stats.loss,
  )
  return new_scales, opt_state, metrics


def _nio_step(loss_fn, cfg: NIOConfig, mesh, tx, params0, scales, opt_state, batch):
  # The formulation is resolved once, when the step is traced (it reads the loss's jaxpr).
  form = formulation.resolve_formulation(
    loss_fn, params0, batch, cfg.num_chunks, cfg.pullback, cfg.conv, cfg.chunk_size
  )
  update = functools.partial(_nio_update, loss_fn, cfg, form, mesh, tx)
  return formulation.with_canonical_convs(update, form)(params0, scales, opt_state, batch)


_STEPS = StepCache("nio", maxsize=32)


def _spec_key(spec: scmod.ScaleSpec):
  spec_leaves, treedef = jax.tree_util.tree_flatten(spec)
  return treedef, tuple(
    (np.shape(x), str(np.asarray(x).dtype), np.asarray(x).tobytes()) for x in spec_leaves
  )


def make_nio_step(
  loss_fn: Callable, spec: scmod.ScaleSpec, config: NIOConfig | None = None, mesh=None
):
  """The NIO `SearchStep`: `init(scales)` (the scale optimiser's state), the jitted `step`
  and `tx` (the scale optimiser).

  `step(params0, scales, opt_state, batch) -> (scales, opt_state, metrics)` where metrics
  has `gc`, `grad_norm` (mean), `grad_norms` [D], `objective`, `constraint` (bool: the
  constraint branch ran), `loss` (mean per-example loss). With a `mesh`, the sample-wise statistics are computed with
  `shard_map` over its `data` axis (`nio_jax.cosine.samplewise_stats`); the batch setting
  is partitioned by `jit` from the batch's sharding.

  The jitted step is cached on (`loss_fn`, the step-relevant config, `spec`, `mesh`), as
  GradInit's and MetaInit's are: repeated searches (`nio()` calls) with the same loss
  function object, shapes and settings compile once. Pass the same `loss_fn` object to
  reuse the compilation (e.g. across seeds).
  """
  cfg = config if isinstance(config, NIOConfig) else NIOConfig.create(config)
  tx = _make_tx(cfg, spec)
  key = (loss_fn, dataclasses.replace(cfg, num_steps=1), mesh, _spec_key(spec))
  step = _STEPS.get(key, lambda: jax.jit(functools.partial(_nio_step, loss_fn, cfg, mesh, tx)))
  return SearchStep(init=tx.init, step=step, tx=tx)


@register("nio", config_cls=NIOConfig, label="NIO", searches=True)
def nio(
  loss_fn: Callable,
  params: PyTree,
  batches: Iterable,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """Runs the NIO search and returns the initialised params.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses. For linen batch-norm
      models close over `batch_stats` and apply in training mode with
      `mutable=["batch_stats"]`, discarding the update (see `nio_jax.flax_utils`), so the
      search uses batch statistics and never changes the running statistics.
    params: initial parameters θ0 (e.g. `model.init(...)["params"]`).
    batches: iterable of batches (a list is cycled; an iterator must last `num_steps`).
    config: None (released defaults), `NIOConfig`, dict or ConfigDict.
    progress: show a tqdm progress bar with GC and gradient norm.
    mesh: optional `jax.sharding.Mesh` with a `data` axis (`nio_jax.distributed.make_mesh()`):
      batches are sharded over it and params/scales replicated (data parallel).

  Returns:
    `InitResult(params=apply_scales(θ0, scales), scales, history)`; history has, per step,
    `gc`, `grad_norm`, `grad_norms`, `objective`, `constraint`, `loss`.

  Raises:
    ValueError / TypeError on bad input (named in the message); `NonFiniteError` (with
    `.step` and `.last_good`) when a value becomes NaN/inf; `ZeroGradientError` when a
    gradient is exactly zero. Params are never returned with NaNs.
  """
  cfg = NIOConfig.create(config)
  _, batches = check_search_inputs(
    loss_fn,
    params,
    batches,
    check_size=lambda b: checks.check_chunks(b, cfg.num_chunks, cfg.overlap),
    mesh=mesh,
  )
  if mesh is not None and cfg.device_loop:
    raise ValueError("device_loop=True is not supported with a mesh; use the host loop.")
  scales, spec = init_search_scales(loss_fn, params, cfg, select=cfg.select)
  search = make_nio_step(loss_fn, spec, cfg, mesh=mesh)
  (params, scales), batches = shard_search(mesh, (params, scales), batches)
  return run_scale_search(
    search.step,
    params,
    scales,
    search.init(scales),
    batches,
    num_steps=cfg.num_steps,
    method="nio",
    config=cfg.to_dict(),
    show_progress=progress,
    num_chunks=cfg.num_chunks,
    on_device=cfg.device_loop,
  )
