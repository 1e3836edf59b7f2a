"""The host loop shared by the scale searches (NIO, GradInit, MetaInit's scale variant).

A search is a `SearchStep`: `init(scales) -> state` and a jitted
`step(params0, scales, state, *batches) -> (scales, state, metrics)`, driven over an iterable of
batches. This loop adds what must happen on the host: taking the
batches, a progress bar, the per-step history, and the safety checks (non-finite values stop
the search with the step number, and the params returned or attached to the error are always
the last finite ones). `device_loop` runs the same steps inside one `lax.scan` instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, errors, formulation, jaxpr_rewrites, leaves, stochastic
from nio_jax import scales as scmod
from nio_jax.batches import iterate_batches, peek, progress_bar
from nio_jax.results import InitResult, stack_history
from nio_jax.scales import apply_scales

PyTree = Any


class SearchStep(NamedTuple):
  """One shape for every scale search's step (NIO, GradInit, MetaInit), as optax gives every
  transformation `init` / `update`.

  Attributes:
    init: `init(scales) -> state`, the optimiser state the first step takes.
    step: `step(params0, scales, state, *batches) -> (scales, state, metrics)`, one jitted
      function (GradInit takes `(batch, next_batch)` unless `lookahead="thirds"`).
    tx: the scale optimiser (`rescale_adam`) when the step uses one, else None (MetaInit's
      sign-momentum variant).
    grad_fn: GradInit's `scale_grad(params0, scales, S, S_tilde) -> (grads, metrics)`, the
      gradient the optimiser receives (un-jitted, for tests and debugging); None elsewhere.
  """

  init: Callable[[PyTree], PyTree]
  step: Callable[..., tuple]
  tx: Any = None
  grad_fn: Callable | None = None


def check_search_inputs(
  loss_fn: Callable,
  params: PyTree,
  batches: Iterable,
  *,
  first: Any = None,
  minimum: int = 2,
  check_size: Callable[[int], None] | None = None,
  mesh=None,
):
  """The input checks every scale search runs first, in one order.

  Checks `params`, attaches per-example PRNG keys to every batch when `loss_fn` is
  stochastic (`nio_jax.stochastic`), takes the first batch (`peek`, unless `first` is
  given), checks its batch
  size (at least `minimum`, then the method's own `check_size(b)`), that `loss_fn` returns
  per-example losses on it, and that `mesh` (if any) can split it.

  Returns:
    `(b, batches)`: the batch size and an iterable that still yields every batch.

  Raises:
    ValueError / TypeError naming the bad input.
  """
  checks.check_params(params)
  # A stochastic loss (`loss_fn.rng_seed`, e.g. dropout) gets a fresh key per batch drawn.
  batches = stochastic.keyed_batches(loss_fn, batches)
  if first is None:
    first, batches = peek(batches)
  else:
    first = stochastic.keyed_batch(loss_fn, first)
  b = checks.check_batch(first, minimum=minimum)
  if check_size is not None:
    check_size(b)
  checks.check_loss_fn(loss_fn, params, first)
  if mesh is not None:
    from nio_jax import distributed  # noqa: PLC0415 (only searches with a mesh need it)

    distributed.check_mesh(mesh, b)
  return b, batches


def init_search_scales(loss_fn: Callable, params: PyTree, cfg, *, select: Any):
  """`scales.init_scales` with a search config's `min_scale` and `min_scale_bias`.

  Args:
    loss_fn: the search's loss function (gives the leaf kinds, `leaves.leaf_kinds_for`).
    params: initial parameters θ0.
    cfg: the method's config (`min_scale`, `min_scale_bias`).
    select: the leaf predicate (usually `cfg.select`; a method may resolve its own default).

  Returns:
    `(scales, spec)` as `scales.init_scales`.
  """
  return scmod.init_scales(
    params,
    select=select,
    min_scale=cfg.min_scale,
    min_scale_bias=cfg.min_scale_bias,
    kinds=leaves.leaf_kinds_for(loss_fn, params),
  )


def conv_step(update: Callable, loss_fn: Callable, cfg, spec, params0, scales, state, batch, *rest):
  """`update(loss_fn', cfg', spec, params0, scales, state, batch, *rest)` of GradInit /
  MetaInit, with the loss's convolutions as `cfg.conv` ("auto": im2col on CPU, where their
  second-order products' convolutions are slow; plain ones run in the canonical layout
  XLA:CPU needs). im2col falls back to plain convolutions where its patches for `batch` do
  not fit the memory guard (`formulation.guard_conv`).

  `cfg.grad_filter` is resolved from the loss as written, before the rewrite: it turns
  convolutions into matmuls, which `nio_jax.leaves` would classify differently.
  """
  conv = formulation.guard_conv(loss_fn, params0, batch, formulation.resolve_conv(cfg.conv))
  grad_filter = leaves.resolve_grad_filter(cfg.grad_filter, loss_fn, params0)
  cfg = dataclasses.replace(cfg, grad_filter=grad_filter)
  fn = functools.partial(update, formulation.with_conv(loss_fn, conv), cfg)
  if conv == "none":
    fn = jaxpr_rewrites.canonical_convs(fn)
  return fn(spec, params0, scales, state, batch, *rest)


def shard_search(mesh, trees, batches):
  """`(trees, batches)` placed for a data-parallel search: `trees` (params, scales, optimiser
  state...) replicated over `mesh`, each batch sharded over its `data` axis; unchanged when
  `mesh` is None."""
  if mesh is None:
    return trees, batches
  from nio_jax import distributed  # noqa: PLC0415

  return distributed.replicate(trees, mesh), distributed.sharded_batches(batches, mesh)


def check_step_batches(group, batch_size_0: int | None, minimum: int = 2) -> int:
  """Checks the batches of one step (`check_batch`) and that their size stays
  `batch_size_0` (when given); returns the last one's size."""
  b = None
  for batch in group:
    b = checks.check_batch(batch, minimum=minimum)
    if batch_size_0 is not None and b != batch_size_0:
      raise ValueError(
        f"batch size changed from {batch_size_0} to {b} during the search; use "
        "a fixed batch size (drop the remainder) so the step compiles once."
      )
  return b


def run_scale_search(
  step_fn: Callable,
  params0: PyTree,
  scales: PyTree,
  opt_state: PyTree,
  batches: Iterable,
  *,
  num_steps: int,
  method: str,
  config: dict,
  per_step: int = 1,
  show_progress: bool = False,
  min_batch: int = 2,
  num_chunks: int | None = None,
  postfix: tuple[str, ...] = ("gc", "grad_norm"),
  on_device: bool = False,
) -> InitResult:
  """Runs `step_fn` for `num_steps` steps and returns an `InitResult`.

  `step_fn(params0, scales, opt_state, *group) -> (scales, opt_state, metrics)`, where
  `metrics` is a flat dict of arrays; if it has `grad_norms`, a zero entry raises
  `ZeroGradientError`. Any non-finite metric or scale raises `NonFiniteError` whose
  `last_good` holds the result up to (not including) the failing step.

  With `on_device=True` all `num_steps` steps run in one compiled `lax.scan` (`device_loop`)
  over batches stacked beforehand: no host round-trip per step, the path for accelerators.
  The result and the history equal the host loop's. Differences: every batch is taken from
  `batches` and held in device memory before the first step; there is no progress bar; the
  checks run in the graph, so a failing step freezes the state and the error (same type,
  step and `last_good`) is raised after the whole scan has run.
  """
  rows: list[dict] = []

  def result(sc):
    return InitResult(
      params=apply_scales(params0, sc),
      scales=sc,
      history=stack_history(rows),
      method=method,
      config=config,
    )

  def check(step, m, scales_finite):
    """The host loop's safety checks of one step (raises), shared by both loops."""
    bad = [k for k, v in m.items() if not np.all(np.isfinite(np.asarray(v, np.float64)))]
    if not bad and not scales_finite:
      bad = ["scales"]
    if bad:
      raise errors.NonFiniteError(
        f"{method}: non-finite {', '.join(bad)} at step {step} "
        f"({ {k: np.asarray(m[k]).tolist() for k in bad if k in m} }). The search stopped; "
        "error.last_good holds the params/scales from before this step. Lower the learning "
        "rate or check the inputs.",
        step=step,
        last_good=result(scales),
      )
    if "grad_norms" in m:
      zero = np.nonzero(np.asarray(m["grad_norms"]) == 0)[0].tolist()
      if zero:
        what = "example" if num_chunks is None else "sub-batch"
        raise errors.ZeroGradientError(
          f"{method}: {what}(s) {zero} have an all-zero gradient at step {step}; their "
          "cosine is undefined. Typical causes: dead ReLUs, a zero-initialised output layer "
          "(Fixup), or a loss that ignores those examples.",
          zero,
        )

  if on_device:
    groups = list(iterate_batches(batches, num_steps, per_step))
    b0 = None
    for group in groups:
      b0 = check_step_batches(group, b0, min_batch)
    stacked = tuple(
      jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[g[i] for g in groups])
      for i in range(per_step)
    )
    scales, _, ms, finite, first_bad = device_loop(step_fn, params0, scales, opt_state, stacked)
    ms, finite = _to_host((ms, finite))
    last = num_steps if int(first_bad) < 0 else int(first_bad) + 1
    for step in range(last):
      m = {k: v[step] for k, v in ms.items()}
      check(step, m, bool(finite[step]))
      rows.append(m)
    return result(scales)

  bar = progress_bar(
    iterate_batches(batches, num_steps, per_step), num_steps, method, show_progress
  )
  b0 = None
  for step, group in enumerate(bar):
    b0 = check_step_batches(group, b0, min_batch)
    new_scales, new_opt_state, metrics = step_fn(params0, scales, opt_state, *group)
    m = _to_host(metrics)  # per-example entries may span other processes' devices
    check(
      step, m, all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree_util.tree_leaves(new_scales))
    )
    rows.append(m)
    scales, opt_state = new_scales, new_opt_state
    if show_progress and hasattr(bar, "set_postfix"):
      bar.set_postfix({k: float(np.mean(m[k])) for k in postfix if k in m})
  return result(scales)


def _to_host(tree):
  """`jax.device_get`, gathering arrays that span other processes (`distributed.to_host`)."""
  from nio_jax import distributed  # noqa: PLC0415

  return distributed.to_host(tree)


def _step_failed(metrics: dict, scales_finite: jax.Array) -> jax.Array:
  """In-graph version of the host loop's checks: any non-finite metric or scale, or an
  exactly zero entry of `grad_norms`."""
  ok = scales_finite
  for v in metrics.values():
    v = jnp.asarray(v)
    if jnp.issubdtype(v.dtype, jnp.inexact):
      ok &= jnp.all(jnp.isfinite(v))
  if "grad_norms" in metrics:
    ok &= jnp.all(jnp.asarray(metrics["grad_norms"]) != 0)
  return ~ok


@functools.partial(jax.jit, static_argnums=(0,))
def device_loop(step_fn: Callable, params0, scales, opt_state, stacked_groups):
  """All steps of a search in one compiled `lax.scan` over pre-stacked batches.

  Args:
    step_fn: `step_fn(params0, scales, opt_state, *group) -> (scales, opt_state, metrics)`.
    params0, scales, opt_state: as for `run_scale_search`.
    stacked_groups: a tuple of `per_step` batches, each leaf with a leading step axis.

  Returns:
    `(scales, opt_state, metrics, scales_finite, first_bad)`: the state after the last good
    step (the loop freezes it at the first step that fails a safety check), the metrics of
    every step stacked on a leading axis, whether each step's new scales were finite, and
    the index of the first failing step (-1 if none). Steps after a failure are computed on
    the frozen state and discarded.
  """

  def body(carry, group):
    scales, opt_state, first_bad, i = carry
    new_scales, new_opt_state, metrics = step_fn(params0, scales, opt_state, *group)
    finite = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(new_scales):
      finite &= jnp.all(jnp.isfinite(leaf))
    first_bad = jnp.where((first_bad < 0) & _step_failed(metrics, finite), i, first_bad)
    keep = first_bad < 0

    def pick(new, old):
      return jnp.where(keep, new, old)

    scales = jax.tree_util.tree_map(pick, new_scales, scales)
    opt_state = jax.tree_util.tree_map(pick, new_opt_state, opt_state)
    return (scales, opt_state, first_bad, i + 1), (metrics, finite)

  init = (scales, opt_state, jnp.array(-1, jnp.int32), jnp.array(0, jnp.int32))
  (scales, opt_state, first_bad, _), (metrics, finite) = jax.lax.scan(body, init, stacked_groups)
  return scales, opt_state, metrics, finite, first_bad
