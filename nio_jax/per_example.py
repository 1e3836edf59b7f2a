"""Per-example and sub-batch gradients: the pullbacks GradCosine is built on.

Contract with user models: `loss_fn(params, batch) -> losses` of shape `[B]`, one loss per
example; `batch` is a pytree whose leaves all have the leading batch axis `B`.

Two settings (see `../shared/ALGORITHMS.md`):

* sample-wise: `g_i = ∇θ ℓ_i(θ)` for each example, computed with `vmap(grad)` over
  single-example batches (optionally in chunks, `lax.map` over `vmap`, to bound memory);
* batch setting: `D` overlapping contiguous sub-batches (`subbatch_bounds`), each gradient
  `g_i = ∇θ mean(ℓ[a_i:b_i])` taken through ONE forward over the whole batch (so batch-norm
  statistics are those of the full batch), by pulling `D` cotangents back through one VJP.

How the gradients are pulled back is a `nio_jax.formulation.Formulation`, resolved once by
the caller (`nio_jax.formulation.resolve_formulation`); the functions here take it as it is.

Guarantees: results are exact gradients (no sampling, no approximation); for a model without
cross-example coupling, the sample-wise gradients equal a Python loop of `jax.grad` calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, formulation, per_example_norms
from nio_jax.formulation import Formulation

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def subbatch_bounds(batch_size: int, num_chunks: int, overlap: float) -> list[tuple[int, int]]:
  """Half-open `[start, end)` of each sub-batch, exactly as the released NIO code slices.

  With `L = int(B / D)`, sub-batch `i` covers `[int((1 − r)·L·i), int((1 + r)·L·(i + 1)))`,
  except that the first starts at 0 and the last ends at `B`. The float expressions are
  evaluated in the reference's order so that the truncations agree bit-for-bit.
  For B = 64, D = 4, r = 0.2: [(0, 19), (12, 38), (25, 57), (38, 64)].
  """
  checks.check_chunks(batch_size, num_chunks, overlap)
  length = int(batch_size / num_chunks)
  r = overlap
  bounds = []
  for i in range(num_chunks):
    if i == 0:
      start, end = 0, int((1 + r) * length * 1)
    elif i == num_chunks - 1:
      start, end = int((1 - r) * length * i), batch_size
    else:
      start, end = int((1 - r) * length * i), int((1 + r) * length * (i + 1))
    bounds.append((start, min(end, batch_size)))
  return bounds


def subbatch_weights(
  batch_size: int, num_chunks: int, overlap: float, dtype=np.float32
) -> np.ndarray:
  """`[D, B]` matrix whose row `i` averages the losses of sub-batch `i` (the VJP cotangents)."""
  w = np.zeros((num_chunks, batch_size), dtype)
  for i, (a, b) in enumerate(subbatch_bounds(batch_size, num_chunks, overlap)):
    w[i, a:b] = 1.0 / (b - a)
  return w


def segment_bounds(batch_size: int, num_chunks: int, overlap: float) -> list[tuple[int, int]]:
  """Disjoint `[start, end)` segments cut at every sub-batch boundary (cover `[0, B)`)."""
  cuts = sorted(
    {c for ab in subbatch_bounds(batch_size, num_chunks, overlap) for c in ab} | {0, batch_size}
  )
  return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def select_leaves(params: PyTree, wrt: Callable[[tuple, Any], bool] | None):
  """Splits `params` into the leaves the gradients are taken with respect to.

  Args:
    params: the parameter pytree.
    wrt: predicate `(path, leaf) -> bool`; None selects every leaf.

  Returns:
    `(selected leaves, rebuild, indices)`: `rebuild(selected)` is the full tree with the
    selected leaves replaced; `indices` are their positions among the flattened leaves.

  Raises:
    ValueError: `wrt` rejects every leaf.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat = [leaf for _, leaf in leaves_with_path]
  if wrt is None:
    idx = list(range(len(flat)))
  else:
    idx = [i for i, (p, leaf) in enumerate(leaves_with_path) if wrt(p, leaf)]
  if not idx:
    if type(wrt).__name__ == "KindFilter":  # the default selection, not a user's predicate
      raise ValueError(
        "no parameter leaf is selected for the gradient: the default leaf selection (the "
        "conv, dense and layer-norm weights and biases, by structure: nio_jax.leaves) found "
        "none in params. Pass grad_filter=None (measure / gradcosine: wrt=None) to use every "
        "leaf, or your "
        "own (path, leaf) -> bool predicate."
      )
    raise ValueError(
      "no parameter leaf is selected for the gradient (the `wrt` / `grad_filter` predicate "
      "you passed rejected every leaf)."
    )

  def rebuild(selected):
    full = list(flat)
    for i, s in zip(idx, selected):
      full[i] = s
    return jax.tree_util.tree_unflatten(treedef, full)

  return [flat[i] for i in idx], rebuild, idx


def _in_groups(fn, xs, group, remat):
  """`fn` over the leading axis of `xs`, `group` at a time (`lax.map`), results concatenated."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if group is None or group >= n:
    return fn(xs)
  body = jax.checkpoint(fn) if remat else fn
  full = n // group * group
  head = jax.tree_util.tree_map(
    lambda x: jnp.reshape(x[:full], (n // group, group, *x.shape[1:])), xs
  )
  out = jax.tree_util.tree_map(
    lambda y: jnp.reshape(y, (full, *y.shape[2:])), jax.lax.map(body, head)
  )
  if full < n:
    tail = body(jax.tree_util.tree_map(lambda x: x[full:], xs))
    out = jax.tree_util.tree_map(lambda a, t: jnp.concatenate([a, t]), out, tail)
  return out


def _pullback_rows(f, primal, w, pullback, group=None, remat=False):
  """(losses, grads): each row of `w` [D, B] pulled back through one VJP of `f -> [B]`.

  `group` rows at a time (`lax.map` over groups, each under `jax.checkpoint` if `remat`).
  """
  losses, vjp = jax.vjp(f, primal)
  w = jnp.asarray(np.asarray(w, losses.dtype) if isinstance(w, np.ndarray) else w, losses.dtype)

  def rows(ws):
    if pullback == "vjp":
      return jax.vmap(vjp)(ws)[0]
    if pullback == "scan":
      return jax.lax.map(lambda row: vjp(row)[0], ws)
    gs = [vjp(ws[i])[0] for i in range(ws.shape[0])]  # "loop"
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *gs)

  return losses, _in_groups(rows, w, group, remat)


def _segment_grads(loss_fn, sel, rebuild, batch, num_chunks, overlap, sites=False):
  """(losses [B], [D, ...] sub-batch gradients) from the segments' summed gradients.

  Each segment gets its own forward and backward, or with `sites` all of them share one
  (`nio_jax.per_example_norms.segment_sums`, which may raise `NormsUnsupported`).
  """
  b = checks.batch_size(batch)
  segs = segment_bounds(b, num_chunks, overlap)
  if sites:
    losses, stacked = per_example_norms.segment_sums(loss_fn, sel, rebuild, batch, segs)
  else:
    losses, seg_grads = [], []
    for a, e in segs:
      part = jax.tree_util.tree_map(lambda x: x[a:e], batch)
      l, vjp = jax.vjp(lambda s: loss_fn(rebuild(s), part), sel)
      losses.append(l)
      seg_grads.append(vjp(jnp.ones_like(l))[0])  # sum of the segment's gradients
    losses = jnp.concatenate(losses)
    stacked = [jnp.stack(gs) for gs in zip(*seg_grads)]
  # sub-batch i = (1/|i|) * sum of the segments it contains
  m = np.zeros((num_chunks, len(segs)), np.float64)
  for i, (a, e) in enumerate(subbatch_bounds(b, num_chunks, overlap)):
    for k, (sa, se) in enumerate(segs):
      if sa >= a and se <= e:
        m[i, k] = 1.0 / (e - a)
  grads = [jnp.tensordot(jnp.asarray(m.astype(g.dtype)), g, axes=1) for g in stacked]
  return losses, grads


def sample_grads_selected(loss_fn, params, batch, form: Formulation, wrt=None):
  """(losses [B], per-example gradients of the selected leaves as `[B, ...]` arrays).

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params, batch: the parameters and a batch (traceable).
    form: the resolved sample-wise `Formulation` (`formulation.resolve_formulation` with
      `num_chunks=None`); `form.group` examples (or rows) at a time.
    wrt: predicate `(path, leaf) -> bool` selecting the leaves (`select_leaves`).
  """
  loss_fn = formulation.with_conv(loss_fn, form.conv)
  sel, rebuild, _ = select_leaves(params, wrt)
  b = checks.batch_size(batch)
  # Sample-wise chunks are not rematerialised: with the XLA:CPU YNN fusions
  # (`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce`, once `nio_jax.xla_defaults`)
  # the second-order gradient through a `jax.checkpoint`ed chunk inside `lax.map` came out
  # wrong (up to 0.18 absolute on the tests' tiny net in float64), while the same chunks
  # without remat, or with the fusions off, are exact.
  if form.pullback in ("vjp", "loop", "scan"):
    w = jnp.eye(b, dtype=jnp.float32)
    f = lambda s: loss_fn(rebuild(s), batch)
    return _pullback_rows(f, sel, w, form.pullback, form.group, remat=False)

  def loss_sel(sel_leaves, example):  # the loss of a one-example batch
    return jnp.reshape(loss_fn(rebuild(sel_leaves), example), (-1,))[0]

  g1 = jax.value_and_grad(loss_sel)
  batch1 = jax.tree_util.tree_map(lambda x: x[:, None], batch)  # [B, 1, ...]
  if form.pullback == "map":
    one = lambda ex1: jax.lax.map(lambda ex: g1(sel, ex), ex1)
  else:  # "vmap"
    one = lambda ex1: jax.vmap(g1, in_axes=(None, 0))(sel, ex1)
  return _in_groups(one, batch1, form.group, remat=False)


def subbatch_grads_selected(loss_fn, params, batch, num_chunks, overlap, form, wrt=None):
  """(losses [B], sub-batch gradients of the selected leaves as `[D, ...]` arrays).

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params, batch: the parameters and a batch (traceable).
    num_chunks, overlap: the D sub-batches and their overlap ratio (`subbatch_bounds`).
    form: the resolved batch-setting `Formulation` (`formulation.resolve_formulation`);
      `form.group` rows at a time, each group under `jax.checkpoint`.
    wrt: predicate `(path, leaf) -> bool` selecting the leaves (`select_leaves`).
  """
  loss_fn = formulation.with_conv(loss_fn, form.conv)
  sel, rebuild, _ = select_leaves(params, wrt)
  b = checks.batch_size(batch)
  if form.pullback in ("segments", "sites"):
    sites = form.pullback == "sites"
    return _segment_grads(loss_fn, sel, rebuild, batch, num_chunks, overlap, sites=sites)
  w = subbatch_weights(b, num_chunks, overlap, np.float64)  # cast to the losses' dtype later
  f = lambda s: loss_fn(rebuild(s), batch)
  return _pullback_rows(f, sel, w, form.pullback, form.group, remat=form.group is not None)


@functools.partial(jax.jit, static_argnames=("loss_fn", "pullback", "conv", "chunk_size", "wrt"))
def _per_example_grads_jit(loss_fn, params, batch, pullback, conv, chunk_size, wrt):
  form = formulation.resolve_formulation(
    loss_fn, params, batch, None, pullback, conv, chunk_size, grads=True
  )
  grads = lambda p, bt: sample_grads_selected(loss_fn, p, bt, form, wrt)[1]
  return formulation.with_canonical_convs(grads, form)(params, batch)


def per_example_grads(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  *,
  pullback: str | None = None,
  conv: str | None = None,
  chunk_size: int | None = None,
  wrt: Callable[[tuple, Any], bool] | None = None,
) -> PyTree:
  """Per-example gradients `∇θ ℓ_i(θ)`, a pytree like `params` with a leading batch axis.

  Computed under `jit`, by default with `vmap(grad)` over one-example batches.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: pytree of float arrays.
    batch: pytree of arrays with a shared leading batch axis `B`.
    pullback: one of `formulation.GRAD_PULLBACKS` or "auto" (see `nio_jax.formulation`);
      None = "vmap". ("norms" builds no per-example gradient, so it is refused here.)
    conv: one of `formulation.CONVS` or "auto"; None = "none".
    chunk_size: if set, examples (or cotangent rows) are processed `chunk_size` at a time
      (`lax.map` over `vmap`).
    wrt: optional predicate `(path, leaf) -> bool`; leaves it rejects get no gradient and
      are returned as zeros.

  Returns:
    A pytree with the structure of `params`; every leaf has shape `[B, *leaf.shape]`.

  Raises:
    ValueError: an unknown or invalid pullback / conv, or a bad chunk_size.
  """
  checks.check_params(params)
  b = checks.check_batch(batch, minimum=1)
  if pullback == "norms":
    raise ValueError(
      "pullback='norms' computes only the per-example gradient norms and the sum of their "
      "unit vectors (GradCosine), never the gradients; per_example_grads takes one of "
      f"{', '.join(formulation.GRAD_PULLBACKS)}, auto."
    )
  if chunk_size is not None and (chunk_size < 1 or chunk_size > b):
    raise ValueError(f"chunk_size={chunk_size} must be in [1, batch size {b}].")
  checks.check_loss_fn(loss_fn, params, batch)
  sel_grads = _per_example_grads_jit(
    loss_fn, params, batch, pullback or "vmap", conv or "none", chunk_size, wrt
  )
  _, _, idx = select_leaves(params, wrt)
  flat, treedef = jax.tree_util.tree_flatten(params)
  out = [jnp.zeros((b,) + jnp.shape(x), jnp.result_type(x)) for x in flat]
  for i, g in zip(idx, sel_grads):
    out[i] = g
  return jax.tree_util.tree_unflatten(treedef, out)
