"""The formulation choice: how the D gradients of GradCosine are computed, decided once.

A formulation is two orthogonal choices, with the same meaning in both settings (the
sample-wise setting is the batch setting with D = B one-example sub-batches, r = 0):

`pullback`: how the D gradients are pulled back.
  One forward over the whole batch, D cotangent rows pulled back through its VJP (exact with
  cross-example coupling such as batch norm; valid in both settings):
  "vjp":  vmap of the VJP over the D rows (one batched backward).
  "loop": D separate backward passes unrolled in the trace (no batched convolutions; the
          fastest on XLA:CPU for small D, see docs/performance.md).
  "scan": lax.map over the D rows (compiles one backward; for large D).
  Each gradient through its own forward (exact only without cross-example coupling):
  "vmap": jax.vmap(jax.grad) over one-example batches (sample-wise only: the sub-batches
          must have equal sizes); `chunk_size` turns it into lax.map over vmapped chunks.
  "map":  lax.map of jax.grad over the examples, one at a time (sample-wise only).
  No per-example gradient at all:
  "norms": the per-example gradient norms and Σ_i g_i/‖g_i‖ from each layer's inputs and
          output cotangents (ghost norms; `nio_jax.per_example_norms`), all GradCosine
          needs (sample-wise GradCosine only; exact without cross-example coupling, and
          refused for a leaf that is not used by exactly one dense / conv / bias / scale
          operation).
  "segments": the batch is cut at every sub-batch boundary into disjoint segments (6 for
          D = 4, r = 0.2); each segment gets one forward and backward (together one
          training step's work instead of one forward + D backwards), and each sub-batch
          gradient is the weighted sum of its segments' gradients (batch setting only).
          With batch norm every segment would use its own statistics, which is not the
          released semantics: refused when the loss reduces over the batch axis.
  "sites": the same segment gradients from ONE forward and backward over the whole batch:
          each dense / conv / bias / scale operation's weight gradient is taken on the
          segments' slices of its input and output cotangent
          (`nio_jax.per_example_norms.segment_sums`), so the network is traced once instead
          of once per segment (batch setting only; the same refusals as "norms": coupling,
          shared weights, a leaf used by another operation).
`conv`: how convolutions are evaluated (`nio_jax.jaxpr_rewrites.rewrite_convs`): "none" (as
  written), "slices" (k×k shifted slices @ kernel) or "im2col" (one matmul on the
  concatenated slices). Every pullback combines with every conv mode.

"auto" for either picks the backend's measured default (`default_formulation`; in the batch
setting on CPU, "segments" where it is exact). A step resolves the user's names once, with
`resolve_formulation`, when it is traced (the choice reads the loss's jaxpr), and passes the
resolved `Formulation` down to the pullbacks (`nio_jax.per_example`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from nio_jax import checks, jaxpr_rewrites

PyTree = Any

PULLBACKS = ("vjp", "loop", "scan", "vmap", "map", "norms", "segments", "sites")
SAMPLE_PULLBACKS = ("vjp", "loop", "scan", "vmap", "map", "norms")
# The sample-wise pullbacks that build the per-example gradients (`per_example_grads`).
GRAD_PULLBACKS = ("vjp", "loop", "scan", "vmap", "map")
SUBBATCH_PULLBACKS = ("vjp", "loop", "scan", "segments", "sites")
CONVS = ("none", *jaxpr_rewrites.CONV_MODES)


class Formulation(NamedTuple):
  """A concrete formulation: no "auto" left, names checked, the memory guard applied.

  Attributes:
    pullback: one of `SAMPLE_PULLBACKS` / `SUBBATCH_PULLBACKS`.
    conv: one of `CONVS`; "none" also where the im2col patches of even one row / example do
      not fit in `IM2COL_MAX_BYTES`.
    group: rows ("vjp", "loop", "scan"; in the batch setting each group under
      `jax.checkpoint`) or examples ("vmap", "map") processed at a time; None = all at once.
    fallback: where "auto" chose "norms": the formulation run instead for a loss that
      "norms" refuses (`nio_jax.per_example_norms.NormsUnsupported`); None elsewhere.
  """

  pullback: str
  conv: str
  group: int | None = None
  fallback: Formulation | None = None


# Backends where the sample-wise "auto" runs "norms" (falling back to `default_formulation`'s
# pullback for a loss it refuses), because it was measured faster there (docs/performance.md).
AUTO_NORMS_BACKENDS: tuple[str, ...] = ()


def default_formulation(num_chunks, backend: str | None = None) -> tuple[str, str]:
  """`(pullback, conv)` chosen by "auto" (measured in benchmarks/, docs/performance.md).

  Args:
    num_chunks: None for the sample-wise setting, else the number of sub-batches D.
    backend: "cpu", "gpu", "tpu", ...; None = `jax.default_backend()`.

  Returns:
    On CPU `("vmap", "im2col")` sample-wise and `("loop", "im2col")` in the batch setting:
    XLA:CPU runs the convolutions of second-order autodiff (grouped convolutions from
    vmap(grad), backward-filter convolutions of the double backward) far slower than
    matmuls. Elsewhere (not measured in this project yet) the textbook forms
    `("vmap", "none")` and `("loop", "none")`. The batch setting's "auto" pullback also
    depends on the loss (`auto_subbatch_pullback`), and the im2col memory guard
    (`IM2COL_MAX_BYTES`) may still chunk the work or, past it, use plain convolutions.
  """
  backend = backend or jax.default_backend()
  pullback = "vmap" if num_chunks is None else "loop"
  return pullback, "im2col" if backend == "cpu" else "none"


def check_formulation(num_chunks, pullback: str | None = "auto", conv: str | None = "auto"):
  """Checks the names of a formulation for a setting ("auto" and None stand for "auto").

  Args:
    num_chunks: None for the sample-wise setting, else D.
    pullback: one of `SAMPLE_PULLBACKS` / `SUBBATCH_PULLBACKS`, or "auto".
    conv: one of `CONVS`, or "auto".

  Raises:
    ValueError: an unknown name, or a pullback that does not exist in this setting (the
      message names the option and its valid values).
  """
  valid = SAMPLE_PULLBACKS if num_chunks is None else SUBBATCH_PULLBACKS
  if pullback in PULLBACKS and pullback not in valid:
    where = "sample-wise (num_chunks=None)" if num_chunks is None else "batch"
    raise ValueError(
      f"pullback={pullback!r} does not exist in the {where} setting; valid there: "
      f"{', '.join(valid)}, auto."
    )
  checks.check_choice("pullback", "auto" if pullback is None else pullback, (*valid, "auto"))
  checks.check_choice("conv", "auto" if conv is None else conv, (*CONVS, "auto"))


def auto_subbatch_pullback(loss_fn, params, batch, backend: str | None = None) -> str:
  """The pullback that `pullback="auto"` runs in the batch setting for this loss.

  On CPU, `"segments"` where it is exact (the loss has no cross-example coupling:
  `nio_jax.jaxpr_rewrites.couples_examples`), because it was measured faster there
  (docs/performance.md); with coupling (batch norm) and on other backends,
  `default_formulation`'s pullback. Traceable: it reads the loss's jaxpr only.
  """
  backend = backend or jax.default_backend()
  default = default_formulation(2, backend)[0]
  if backend != "cpu" or jaxpr_rewrites.couples_examples(loss_fn, params, batch):
    return default
  return "segments"


def auto_sample_pullback(loss_fn, params, batch, backend: str | None = None) -> str:
  """The pullback that `pullback="auto"` runs in the sample-wise setting for this loss.

  `"norms"` on the backends of `AUTO_NORMS_BACKENDS` for a loss without cross-example
  coupling (measured faster there, docs/performance.md); `default_formulation`'s pullback
  otherwise. `resolve_formulation` keeps that one as the fallback for a loss whose leaves
  "norms" refuses. Traceable: it reads the loss's jaxpr only.
  """
  backend = backend or jax.default_backend()
  default = default_formulation(None, backend)[0]
  if backend not in AUTO_NORMS_BACKENDS:
    return default
  if jaxpr_rewrites.couples_examples(loss_fn, params, batch):
    return default
  return "norms"


def check_segments(loss_fn, params, batch, pullback: str = "segments") -> None:
  """Refuses `pullback="segments"` (or "sites") for a loss that couples the examples.

  Raises:
    ValueError: `nio_jax.jaxpr_rewrites.couples_examples` found a reduction over the batch
      axis.
  """
  if jaxpr_rewrites.couples_examples(loss_fn, params, batch):
    raise ValueError(
      f"pullback={pullback!r} is exact only for models without cross-example coupling, and "
      "loss_fn reduces over the batch axis (batch norm?): each segment would use its own "
      "statistics. Use pullback='loop', 'vjp' or 'scan' (one forward over the whole batch)."
    )


# Memory guard of the im2col form: the patches are k×k times wider than the conv inputs, and
# autodiff keeps them and their cotangents (XLA's temp memory of the ResNet-20 B=32
# batch-setting NIO step was ≈6x the forward patches: 1.3 GB). `plan_formulation` estimates
# the patch bytes alive at once from `jaxpr_rewrites.im2col_bytes` (P, the forward patches of
# the whole batch):
#   * one forward + D rows pulled back together ("vjp", "loop", "scan"): P·(1 + D);
#   * own forward per example ("vmap", "map"), c examples at a time: 2·P·c/B;
#   * "segments" and "norms" (one training step's work): 2·P.
# Above this budget the D rows (or the examples) are processed in groups that fit; the row
# groups under `jax.checkpoint` so that the NIO step's second-order pass does not keep every
# group's intermediates (example chunks without it, see `nio_jax.per_example`); when not
# even one row / example fits, convolutions stay plain. Set to None to disable.
IM2COL_MAX_BYTES: int | None = 8 * 2**30


def plan_formulation(loss_fn, params, batch, num_chunks, pullback, conv) -> Formulation:
  """Applies the im2col memory guard (`IM2COL_MAX_BYTES`) to a concrete `(pullback, conv)`."""
  budget = IM2COL_MAX_BYTES
  if conv != "im2col" or budget is None:
    return Formulation(pullback, conv)
  if pullback in ("segments", "sites", "norms"):  # one forward and backward over the batch
    return Formulation(pullback, guard_conv(loss_fn, params, batch, conv))
  b = checks.batch_size(batch)
  patches = jaxpr_rewrites.im2col_bytes(loss_fn, params, batch)
  if patches == 0:
    return Formulation(pullback, conv)
  if pullback in ("vmap", "map"):
    fit = int(b * budget // (2 * patches))  # examples whose patches fit at once
    n = b
  else:
    fit = int(budget // patches) - 1  # rows pulled back together next to the forward
    n = b if num_chunks is None else num_chunks
  if fit >= n:
    return Formulation(pullback, conv)
  if fit >= 1:
    return Formulation(pullback, conv, fit)
  return Formulation(pullback, "none")


def resolve_formulation(
  loss_fn: Callable,
  params: PyTree,
  batch: PyTree,
  num_chunks: int | None,
  pullback: str | None = "auto",
  conv: str | None = "auto",
  chunk_size: int | None = None,
  backend: str | None = None,
  grads: bool = False,
) -> Formulation:
  """The concrete `Formulation` of a setting for this loss: the one place "auto" is resolved.

  Called once where a step is traced (the NIO step, the GradCosine statistics,
  `per_example_grads`); the pullbacks take its result. Traceable: it reads the loss's jaxpr
  at the shapes of `params` and `batch`, never their values.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params, batch: concrete or traced; only their shapes and dtypes are read.
    num_chunks: None for the sample-wise setting, else D.
    pullback: one of `SAMPLE_PULLBACKS` / `SUBBATCH_PULLBACKS`, or "auto" (None = "auto"):
      `default_formulation`'s, and in the batch setting `auto_subbatch_pullback`'s.
    conv: one of `CONVS`, or "auto" (None = "auto").
    chunk_size: sample-wise only: at most this many examples (or rows) at a time.
    backend: whose defaults "auto" takes; None = `jax.default_backend()`.
    grads: the caller needs the per-example gradients themselves (`per_example_grads`):
      "auto" never picks "norms".

  Returns:
    The `Formulation`, after the im2col memory guard (`plan_formulation`).

  Raises:
    ValueError: an unknown name, a pullback that does not exist in this setting, or
      `pullback="segments"` for a loss with cross-example coupling (`check_segments`).
  """
  check_formulation(num_chunks, pullback, conv)
  auto_pullback, auto_conv = default_formulation(num_chunks, backend)
  pullback_was_auto = pullback in ("auto", None)
  if pullback_was_auto:
    if num_chunks is None:
      pullback = auto_pullback
    else:
      pullback = auto_subbatch_pullback(loss_fn, params, batch, backend)
  elif pullback in ("segments", "sites"):
    check_segments(loss_fn, params, batch, pullback)
  conv = auto_conv if conv in ("auto", None) else conv
  form = plan_formulation(loss_fn, params, batch, num_chunks, pullback, conv)
  if num_chunks is None and chunk_size is not None:
    form = form._replace(group=min(chunk_size, form.group or chunk_size))
  auto_norms = num_chunks is None and pullback_was_auto and not grads and chunk_size is None
  if auto_norms and auto_sample_pullback(loss_fn, params, batch, backend) == "norms":
    norms = plan_formulation(loss_fn, params, batch, None, "norms", conv)
    return norms._replace(fallback=form)
  return form


def resolve_conv(conv: str | None = "auto", backend: str | None = None) -> str:
  """The conv mode of a step without a pullback choice (GradInit, MetaInit).

  "auto" (or None) is the backend's measured default (`default_formulation`: "im2col" on
  CPU, "none" elsewhere); any other value must be one of `CONVS`.

  Raises:
    ValueError: an unknown conv mode (the message lists the valid ones).
  """
  checks.check_choice("conv", "auto" if conv is None else conv, (*CONVS, "auto"))
  return default_formulation(2, backend)[1] if conv in ("auto", None) else conv


def guard_conv(loss_fn: Callable, params: PyTree, batch: PyTree, conv: str) -> str:
  """`conv` for a step of one training step's second-order work, after the im2col memory
  guard: "none" where the forward patches and their cotangents (2·P,
  `jaxpr_rewrites.im2col_bytes`) would exceed `IM2COL_MAX_BYTES`. The rule of GradInit and
  MetaInit, and of `plan_formulation` for "segments", "sites" and "norms". Traceable (reads
  shapes)."""
  budget = IM2COL_MAX_BYTES
  if conv != "im2col" or budget is None:
    return conv
  return conv if 2 * jaxpr_rewrites.im2col_bytes(loss_fn, params, batch) <= budget else "none"


def with_conv(loss_fn: Callable, conv: str) -> Callable:
  """`loss_fn` with its convolutions evaluated as `conv` ("none": as written)."""
  return loss_fn if conv == "none" else jaxpr_rewrites.rewrite_convs(loss_fn, conv)


def with_canonical_convs(fn: Callable, form: Formulation) -> Callable:
  """`fn` under `jaxpr_rewrites.canonical_convs` where `form` keeps plain convolutions.

  The scanned blocks' backward convolutions need it on XLA:CPU; the im2col / slices forms
  leave no convolution to rewrite, so there the trace would be wasted. Apply it to the whole
  differentiated step, inside `jax.jit` and outside every `jax.grad`.
  """
  return jaxpr_rewrites.canonical_convs(fn) if form.conv == "none" else fn
