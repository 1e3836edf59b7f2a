"""Per-example and sub-batch gradients: the machinery GradCosine is built on.

Contract with user models: `loss_fn(params, batch) -> losses` of shape `[B]`, one loss per
example; `batch` is a pytree whose leaves all have the leading batch axis `B`.

Two settings (see `../shared/ALGORITHMS.md`):

* sample-wise: `g_i = ∇θ ℓ_i(θ)` for each example, computed with `vmap(grad)` over
  single-example batches (optionally in chunks, `lax.map` over `vmap`, to bound memory);
* batch setting: `D` overlapping contiguous sub-batches (`subbatch_bounds`), each gradient
  `g_i = ∇θ mean(ℓ[a_i:b_i])` taken through ONE forward over the whole batch (so batch-norm
  statistics are those of the full batch), by pulling `D` cotangents back through one VJP.

Guarantees: results are exact gradients (no sampling, no approximation); for a model without
cross-example coupling, the sample-wise gradients equal a Python loop of `jax.grad` calls.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import errors

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

# How the D gradients are pulled back through the shared forward in the batch setting.
#   "vmap": vmap of the VJP over the D cotangent rows (one batched backward).
#   "loop": D separate backward passes unrolled in the trace (no batched convolutions;
#           the fastest on XLA:CPU for small D, see benchmarks/).
#   "map":  lax.map over the D cotangents (compiles one backward; for large D).
#   "loop_im2col" / "vmap_im2col": the same with every convolution evaluated as im2col @ kernel
#           (see `rewrite_convs`).
#   "segments": NO shared forward: the batch is cut at every sub-batch boundary into disjoint
#           segments (7 for D = 4, r = 0.2), each segment gets its own forward and backward
#           (together one training step's work instead of one forward + D backwards), and
#           each sub-batch gradient is the weighted sum of its segments' gradients. Exact ONLY
#           for models without cross-example coupling (no batch-norm): with batch norm every
#           segment would use its own statistics, which is not the released semantics.
#           Never picked by default; choose it explicitly for normalisation-free models.
#   "segments_im2col": both.
SUBBATCH_IMPLS = (
  "vmap",
  "loop",
  "map",
  "loop_im2col",
  "vmap_im2col",
  "segments",
  "segments_im2col",
)
# How per-example gradients are computed in the sample-wise setting.
#   "vmap":  jax.vmap(jax.grad) over single-example batches (the textbook form);
#   "map":   lax.map over examples of jax.grad (no grouped convolutions, less memory);
#   "vjp":   the batch-setting machinery with D = B, r = 0 (one forward over the batch; the
#            right choice for models with cross-example coupling such as batch-norm).
#   "slices": vmap(grad) of the loss with every convolution rewritten as k×k shifted slices of
#            the input times the kernel (`rewrite_convs(mode="slices")`): the per-example
#            weight gradients become batched matmuls instead of grouped convolutions.
#   "im2col": the same with one matmul on the concatenated k×k slices (im2col patches).
SAMPLE_IMPLS = ("vmap", "map", "vjp", "slices", "im2col")
CONV_MODES = ("slices", "im2col")


def subbatch_bounds(batch_size: int, num_chunks: int, overlap: float) -> list[tuple[int, int]]:
  """Half-open `[start, end)` of each sub-batch, exactly as the released NIO code slices.

  With `L = int(B / D)`, sub-batch `i` covers `[int((1 − r)·L·i), int((1 + r)·L·(i + 1)))`,
  except that the first starts at 0 and the last ends at `B`. The float expressions are
  evaluated in the reference's order so that the truncations agree bit-for-bit.
  For B = 64, D = 4, r = 0.2: [(0, 19), (12, 38), (25, 57), (38, 64)].
  """
  errors.check_chunks(batch_size, num_chunks, overlap)
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


# ----------------------------------------------------------------------------------------
# Leaf selection: which parameter leaves the gradients are taken with respect to.


def select_leaves(params: PyTree, wrt: Callable[[tuple, Any], bool] | None):
  """Splits `params` into (selected leaves, a function rebuilding the full tree from them)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in leaves_with_path]
  if wrt is None:
    idx = list(range(len(leaves)))
  else:
    idx = [i for i, (p, leaf) in enumerate(leaves_with_path) if wrt(p, leaf)]
  if not idx:
    raise ValueError(
      "no parameter leaf is selected for the gradient (the `wrt` predicate rejected every leaf)."
    )

  def rebuild(selected):
    full = list(leaves)
    for i, s in zip(idx, selected):
      full[i] = s
    return jax.tree_util.tree_unflatten(treedef, full)

  return [leaves[i] for i in idx], rebuild, idx


# ----------------------------------------------------------------------------------------
# Convolutions as matmuls: a jaxpr rewrite of the user's loss function.
#
# Differentiating `vmap(grad)` of `lax.conv_general_dilated` produces grouped convolutions
# (feature_group_count = batch), which XLA:CPU runs very slowly. Written as shifted slices of
# the (padded) input times the kernel, the same convolution differentiates into batched
# matmuls. The model is not touched: its jaxpr is re-evaluated with every supported
# convolution replaced, recursing into jit, scan (flax `nn.scan`) and custom_jvp/vjp bodies
# that contain convolutions (those bodies are inlined: a custom derivative rule around a
# convolution is replaced by autodiff of the rewritten body, which is the same maths).


def conv_as_matmul(
  lhs,
  rhs,
  *,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  mode="im2col",
  **unused,
):
  """`lax.conv_general_dilated` evaluated as slices/im2col @ kernel (exactly the same sums).

  Falls back to the convolution for grouped or input-dilated convolutions.
  """
  del unused
  nsp = lhs.ndim - 2
  lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
  rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
  if (
    feature_group_count != 1
    or batch_group_count != 1
    or any(d != 1 for d in lhs_dilation)
    or isinstance(padding, str)
  ):
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
    )
  ls, rs, os_ = dimension_numbers
  x = jnp.transpose(lhs, (ls[0], *ls[2:], ls[1]))  # N, spatial..., C
  w = jnp.transpose(rhs, (*rs[2:], rs[1], rs[0]))  # spatial..., I, O
  zero = jnp.zeros((), x.dtype)
  x = jax.lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)])
  ksz = w.shape[:nsp]
  out_sz = [
    (x.shape[1 + d] - (ksz[d] - 1) * rhs_dilation[d] - 1) // window_strides[d] + 1
    for d in range(nsp)
  ]
  slices = []
  for idx in itertools.product(*[range(k) for k in ksz]):
    start = [0] + [idx[d] * rhs_dilation[d] for d in range(nsp)] + [0]
    limit = (
      [x.shape[0]]
      + [start[1 + d] + (out_sz[d] - 1) * window_strides[d] + 1 for d in range(nsp)]
      + [x.shape[-1]]
    )
    slices.append(jax.lax.slice(x, start, limit, [1] + list(window_strides) + [1]))
  dn = (((x.ndim - 1,), (0,)), ((), ()))
  if mode == "im2col" and len(slices) > 1:
    patches = jnp.concatenate(slices, axis=-1)
    y = jax.lax.dot_general(
      patches,
      jnp.reshape(w, (-1, w.shape[-1])),
      dn,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  else:
    wk = jnp.reshape(w, (-1,) + w.shape[nsp:])
    y = None
    for k, s in enumerate(slices):
      t = jax.lax.dot_general(
        s, wk[k], dn, precision=precision, preferred_element_type=preferred_element_type
      )
      y = t if y is None else y + t
  perm = (os_[0], *os_[2:], os_[1])  # out[perm] == y  =>  out = y.transpose(argsort)
  return jnp.transpose(y, tuple(int(i) for i in np.argsort(perm)))


def _sub_closed_jaxprs(params):
  for v in params.values():
    vs = v if isinstance(v, (tuple, list)) else (v,)
    for x in vs:
      if hasattr(x, "jaxpr") and hasattr(x, "consts"):
        yield x.jaxpr
      elif type(x).__name__ == "Jaxpr":
        yield x


def _has_conv(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    if any(_has_conv(j) for j in _sub_closed_jaxprs(eqn.params)):
      return True
  return False


_INLINE = {
  "pjit": "jaxpr",
  "jit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "remat": "jaxpr",
  "checkpoint": "jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def _bind(eqn, inv):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
    subfuns, bind_params = bind_params
    inv = [*subfuns, *inv]
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*inv, **bind_params)
  return outs if eqn.primitive.multiple_results else [outs]


def _eval_rewritten(jaxpr, consts, args, mode):
  env = {}

  def read(v):
    return v.val if type(v).__name__ == "Literal" else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    inv = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      if mode == "canonical":
        outs = [canonical_conv(*inv, **eqn.params)]
      else:
        outs = [conv_as_matmul(*inv, **eqn.params, mode=mode)]
    elif not any(_has_conv(j) for j in _sub_closed_jaxprs(eqn.params)):
      outs = _bind(eqn, inv)
    elif name in _INLINE and _INLINE[name] in eqn.params:
      sub = eqn.params[_INLINE[name]]
      sub_consts = getattr(sub, "consts", ())
      sub = getattr(sub, "jaxpr", sub)
      outs = _eval_rewritten(sub, sub_consts, inv[len(inv) - len(sub.invars) :], mode)
    elif name == "scan":
      p = eqn.params
      nc, ncar = p["num_consts"], p["num_carry"]
      sc, carry0, xs = inv[:nc], inv[nc : nc + ncar], inv[nc + ncar :]
      cj = p["jaxpr"]

      def body(carry, x, cj=cj, sc=sc, ncar=ncar):
        o = _eval_rewritten(cj.jaxpr, cj.consts, [*sc, *carry, *x], mode)
        return list(o[:ncar]), list(o[ncar:])

      carry, ys = jax.lax.scan(
        body, list(carry0), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
      )
      outs = [*carry, *ys]
    else:  # a control-flow primitive we do not rewrite: keep its convolutions
      outs = _bind(eqn, inv)
    for v, o in zip(eqn.outvars, outs):
      if type(v).__name__ != "DropVar":
        env[v] = o
  return [read(v) for v in jaxpr.outvars]


# `rewrite_convs` and `im2col_bytes` read JAX's internal jaxpr (equation primitive names, the
# params of pjit/scan/custom_* equations, `get_bind_params`), which JAX changes without notice
# between releases. They run only on the JAX minor releases the suite tested them on.
JAXPR_TESTED_JAX = ((0, 10),)
ALLOW_UNTESTED_JAX_ENV = "NIO_JAX_ALLOW_UNTESTED_JAX"


def check_jaxpr_internals() -> None:
  """Raises unless the installed jax is a release the jaxpr rewrite was tested on.

  Raises:
    RuntimeError: `jax.__version__` is not in `JAXPR_TESTED_JAX` (and the environment
      variable `NIO_JAX_ALLOW_UNTESTED_JAX` is not 1); the message says what to do instead.
  """
  version = jax.__version__
  try:
    minor = tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    minor = None
  if minor in JAXPR_TESTED_JAX or os.environ.get(ALLOW_UNTESTED_JAX_ENV) == "1":
    return
  tested = ", ".join(f"{a}.{b}.x" for a, b in JAXPR_TESTED_JAX)
  raise RuntimeError(
    f"the convolution rewrite (rewrite_convs: the im2col/slices formulations) reads JAX's "
    f"internal jaxpr and was tested on jax {tested} only; this is jax {version}. Choose a "
    f"formulation without the conv rewrite, install the tested jax (pip install -c "
    f"constraints.txt nio_jax, or 'jax>=0.10.2,<0.11'), or set {ALLOW_UNTESTED_JAX_ENV}=1 to "
    f"run it untested."
  )


def rewrite_convs(fn: Callable, mode: str = "im2col") -> Callable:
  """`fn` with every convolution evaluated as `mode` ("slices" or "im2col") @ kernel.

  Same values (up to float summation order) and same derivatives; use it to choose the
  matmul form of convolutions where the backend runs it faster (see `default_impl`).
  """
  errors.check_choice("mode", mode, CONV_MODES)
  check_jaxpr_internals()

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if not _has_conv(closed.jaxpr):
      return fn(*args)
    outs = _eval_rewritten(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), mode)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped


# Canonical convolutions: XLA:CPU runs a convolution with its fast library kernel only when
# its dimension numbers are the canonical NHWC / HWIO -> NHWC. Its `ConvCanonicalization`
# pass rewrites the others into canonical form with transposes, but only in the entry
# computation. The gradient of a convolution (input gradient: kernel `01oi`; kernel
# gradient: `f01b_i01o->01bf`) inside a while-loop body, i.e. the backward pass of an
# `nn.scan` stack, therefore falls back to XLA's generic loop-nest kernel, 10-30x slower.
# `canonical_convs` does the canonicalisation itself, in the jaxpr, before XLA sees it.
# One case remains: in a double backward (NIO, GradInit, MetaInit with plain convolutions),
# XLA's simplifier swaps the operands of a convolution whose kernel is larger than its input
# (the transpose of a kernel-gradient convolution) and the swapped one (`rhs_reversal`) is not
# canonical again. The im2col forms (the NIO default on CPU) have no convolutions at all.


def canonical_conv(
  lhs,
  rhs,
  *,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  **unused,
):
  """`lax.conv_general_dilated` with operands transposed to (N, spatial..., C) and
  (spatial..., I, O): the same convolution, computed in canonical dimension numbers.

  Already canonical convolutions are returned as they are (no transposes).
  """
  del unused
  ls, rs, os_ = dimension_numbers
  nsp = lhs.ndim - 2
  lhs_perm = (ls[0], *ls[2:], ls[1])
  rhs_perm = (*rs[2:], rs[1], rs[0])
  out_perm = (os_[0], *os_[2:], os_[1])
  identity = tuple(range(nsp + 2))
  x = lhs if lhs_perm == identity else jnp.transpose(lhs, lhs_perm)
  w = rhs if rhs_perm == identity else jnp.transpose(rhs, rhs_perm)
  spatial = tuple(range(1, nsp + 1))
  dn = jax.lax.ConvDimensionNumbers(
    lhs_spec=(0, nsp + 1, *spatial),
    rhs_spec=(nsp + 1, nsp, *range(nsp)),
    out_spec=(0, nsp + 1, *spatial),
  )
  y = jax.lax.conv_general_dilated(
    x,
    w,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dn,
    feature_group_count,
    batch_group_count,
    precision,
    preferred_element_type,
  )
  if out_perm == identity:
    return y
  return jnp.transpose(y, tuple(int(i) for i in np.argsort(out_perm)))


def canonical_convs(fn: Callable, backends: tuple[str, ...] | None = ("cpu",)) -> Callable:
  """`fn` with every convolution computed in canonical dimension numbers (`canonical_conv`).

  Apply it to the *differentiated* function, outside every `jax.grad` / `jax.vjp` /
  `jax.jvp` and just inside `jax.jit` (e.g. `jax.jit(canonical_convs(train_step))`): the
  convolutions that need it are the ones autodiff creates. The values are the same
  convolutions (same sums, same order of XLA's library kernel); only operand layouts change.
  Recurses into jit, `scan` (flax `nn.scan`) and custom_jvp/vjp bodies; convolutions inside
  `while_loop` / `cond` bodies are kept as they are.

  Args:
    fn: any function of pytrees of arrays.
    backends: rewrite only when `jax.default_backend()` is one of these (default: XLA:CPU,
      the backend whose scanned gradients need it); `None`: always. On a JAX release the
      jaxpr rewrite was not tested on (`check_jaxpr_internals`) `fn` runs unchanged.

  Returns:
    A function with the signature of `fn`.
  """

  def wrapped(*args, **kwargs):
    if backends is not None and jax.default_backend() not in backends:
      return fn(*args, **kwargs)
    try:  # an optimisation only: on an untested JAX release keep the plain convolutions
      check_jaxpr_internals()
    except RuntimeError:
      return fn(*args, **kwargs)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    # Array leaves are traced; anything else (a loss function, a config passed as a static
    # argument of `jax.jit`) is closed over as it is.
    dynamic = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]

    def flat_fn(*arrays):
      it = iter(arrays)
      full = [next(it) if d else x for x, d in zip(leaves, dynamic)]
      a, k = jax.tree_util.tree_unflatten(treedef, full)
      return fn(*a, **k)

    arrays = [x for x, d in zip(leaves, dynamic) if d]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    if _has_conv(closed.jaxpr):
      outs = _eval_rewritten(closed.jaxpr, closed.consts, arrays, "canonical")
    else:
      outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *arrays)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return functools.wraps(fn)(wrapped)


# Memory guard of the im2col forms: the patches are k×k times wider than the conv inputs and
# autodiff keeps them (XLA's temp memory of the ResNet-20 B=32 batch-setting NIO step was
# ≈6x the forward patches: 1.3 GB). Above this many bytes of forward patches the batch
# setting falls back to the plain-convolution form and the sample-wise setting processes the
# examples in chunks. Set to None to disable.
IM2COL_MAX_BYTES: int | None = 2 * 2**30


def im2col_bytes(fn: Callable, *args) -> int:
  """Bytes of the im2col patches that `rewrite_convs(fn, "im2col")(*args)` would build."""
  check_jaxpr_internals()
  closed = jax.make_jaxpr(fn)(*args)

  def walk(jaxpr, mult):
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out = eqn.outvars[0].aval
        rs, os_ = eqn.params["dimension_numbers"][1], eqn.params["dimension_numbers"][2]
        k = int(np.prod([rhs.shape[d] for d in rs[2:]]))
        cin = rhs.shape[rs[1]]
        total += mult * int(np.prod(out.shape)) // out.shape[os_[1]] * k * cin * out.dtype.itemsize
      m = mult * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
      for sub in _sub_closed_jaxprs(eqn.params):
        total += walk(sub, m)
    return total

  return walk(closed.jaxpr, 1)


def _im2col_fits(fn, *args) -> bool:
  return IM2COL_MAX_BYTES is None or im2col_bytes(fn, *args) <= IM2COL_MAX_BYTES


def _example(batch, i):
  return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, 0), batch)


def _single_loss(loss_fn, params, example):
  """Loss of a one-example batch (leaves with leading axis 1)."""
  losses = loss_fn(params, example)
  return jnp.reshape(losses, (-1,))[0]


def check_loss_fn(loss_fn: LossFn, params: PyTree, batch: PyTree) -> None:
  """Checks, without running it, that `loss_fn` returns one float loss per example (see
  `nio_jax.errors.check_loss_fn`, which this forwards to)."""
  errors.check_loss_fn(loss_fn, params, batch)


def _per_example_selected(loss_fn, params, batch, wrt, impl, chunk_size):
  if impl in CONV_MODES:
    if IM2COL_MAX_BYTES is not None:
      need = im2col_bytes(loss_fn, params, batch)
      b = errors.batch_size(batch)
      if need > IM2COL_MAX_BYTES:  # bound the memory by processing examples in chunks
        fit = max(1, int(b * IM2COL_MAX_BYTES // need))
        chunk_size = fit if chunk_size is None else min(chunk_size, fit)
    loss_fn, impl = rewrite_convs(loss_fn, impl), "vmap"
  sel, rebuild, _ = select_leaves(params, wrt)
  b = errors.batch_size(batch)

  def loss_sel(sel_leaves, example):
    return _single_loss(loss_fn, rebuild(sel_leaves), example)

  g1 = jax.value_and_grad(loss_sel)

  if impl == "vjp":
    w = jnp.eye(b, dtype=jnp.float32)
    return _pullback_rows(lambda s: loss_fn(rebuild(s), batch), sel, w, "vmap")

  batch1 = jax.tree_util.tree_map(lambda x: x[:, None], batch)  # [B, 1, ...]
  if impl == "vmap" and (chunk_size is None or chunk_size >= b):
    return jax.vmap(g1, in_axes=(None, 0))(sel, batch1)
  # "map", or chunked "vmap": lax.map over chunks of `chunk_size` vmapped examples.
  return jax.lax.map(lambda ex: g1(sel, ex), batch1, batch_size=chunk_size)


def _pullback_rows(f, primal, w, impl):
  """(losses, grads): each row of `w` [D, B] pulled back through one VJP of `f -> [B]`."""
  losses, vjp = jax.vjp(f, primal)
  w = jnp.asarray(np.asarray(w, losses.dtype) if isinstance(w, np.ndarray) else w, losses.dtype)
  if impl == "vmap":
    (g,) = jax.vmap(vjp)(w)
    return losses, g
  if impl == "map":
    return losses, jax.lax.map(lambda row: vjp(row)[0], w)
  rows = [vjp(w[i])[0] for i in range(w.shape[0])]
  return losses, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows)


@functools.partial(jax.jit, static_argnames=("loss_fn", "impl", "chunk_size", "wrt"))
@canonical_convs
def _per_example_grads_jit(loss_fn, params, batch, impl, chunk_size, wrt):
  _, sel_grads = _per_example_selected(loss_fn, params, batch, wrt, impl, chunk_size)
  return sel_grads


def per_example_grads(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  *,
  impl: str = "vmap",
  chunk_size: int | None = None,
  wrt: Callable[[tuple, Any], bool] | None = None,
) -> PyTree:
  """Per-example gradients `∇θ ℓ_i(θ)`, a pytree like `params` with a leading batch axis.

  Computed with `vmap(grad)` over one-example batches under `jit`.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: pytree of float arrays.
    batch: pytree of arrays with a shared leading batch axis `B`.
    impl: one of `SAMPLE_IMPLS` ("vmap", "map", "vjp").
    chunk_size: if set, examples are processed `chunk_size` at a time (`lax.map` over
      `vmap`), which bounds peak memory by the chunk instead of the batch.
    wrt: optional predicate `(path, leaf) -> bool`; leaves it rejects get no gradient and
      are returned as zeros.

  Returns:
    A pytree with the structure of `params`; every leaf has shape `[B, *leaf.shape]`.
  """
  errors.check_choice("impl", impl, SAMPLE_IMPLS)
  errors.check_params(params)
  b = errors.check_batch(batch, minimum=1)
  if chunk_size is not None and (chunk_size < 1 or chunk_size > b):
    raise ValueError(f"chunk_size={chunk_size} must be in [1, batch size {b}].")
  check_loss_fn(loss_fn, params, batch)
  sel_grads = _per_example_grads_jit(loss_fn, params, batch, impl, chunk_size, wrt)
  _, _, idx = select_leaves(params, wrt)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = [jnp.zeros((b,) + jnp.shape(x), jnp.result_type(x)) for x in leaves]
  for i, g in zip(idx, sel_grads):
    out[i] = g
  return jax.tree_util.tree_unflatten(treedef, out)


def segment_bounds(batch_size: int, num_chunks: int, overlap: float) -> list[tuple[int, int]]:
  """Disjoint `[start, end)` segments cut at every sub-batch boundary (cover `[0, B)`)."""
  cuts = sorted(
    {c for ab in subbatch_bounds(batch_size, num_chunks, overlap) for c in ab} | {0, batch_size}
  )
  return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _segment_grads(loss_fn, sel, rebuild, batch, num_chunks, overlap):
  """(losses [B], [D, ...] sub-batch gradients) from one forward/backward per segment."""
  b = errors.batch_size(batch)
  segs = segment_bounds(b, num_chunks, overlap)
  losses, seg_grads = [], []
  for a, e in segs:
    part = jax.tree_util.tree_map(lambda x: x[a:e], batch)
    l, vjp = jax.vjp(lambda s: loss_fn(rebuild(s), part), sel)
    losses.append(l)
    seg_grads.append(vjp(jnp.ones_like(l))[0])  # sum of the segment's gradients
  # sub-batch i = (1/|i|) * sum of the segments it contains
  m = np.zeros((num_chunks, len(segs)), np.float64)
  for i, (a, e) in enumerate(subbatch_bounds(b, num_chunks, overlap)):
    for k, (sa, se) in enumerate(segs):
      if sa >= a and se <= e:
        m[i, k] = 1.0 / (e - a)
  grads = jax.tree_util.tree_map(
    lambda *gs: jnp.tensordot(jnp.asarray(m.astype(gs[0].dtype)), jnp.stack(gs), axes=1), *seg_grads
  )
  return jnp.concatenate(losses), grads


def subbatch_grads_selected(loss_fn, params, batch, num_chunks, overlap, wrt=None, impl="loop"):
  """(losses [B], sub-batch gradients of the selected leaves as `[D, ...]` arrays)."""
  if impl.endswith("_im2col"):
    base = impl[: -len("_im2col")]
    if _im2col_fits(loss_fn, params, batch):
      loss_fn = rewrite_convs(loss_fn, "im2col")
    impl = base  # too big: plain convolutions (IM2COL_MAX_BYTES)
  sel, rebuild, _ = select_leaves(params, wrt)
  b = errors.batch_size(batch)
  if impl == "segments":
    return _segment_grads(loss_fn, sel, rebuild, batch, num_chunks, overlap)
  w = subbatch_weights(b, num_chunks, overlap, np.float64)  # cast to the losses' dtype later
  return _pullback_rows(lambda s: loss_fn(rebuild(s), batch), sel, w, impl)


def sample_grads_selected(loss_fn, params, batch, wrt=None, impl="vmap", chunk_size=None):
  """(losses [B], per-example gradients of the selected leaves as `[B, ...]` arrays)."""
  return _per_example_selected(loss_fn, params, batch, wrt, impl, chunk_size)
