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
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import errors

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

# A formulation is two orthogonal choices, with the same meaning in both settings (the
# sample-wise setting is the batch setting with D = B one-example sub-batches, r = 0):
#
# `pullback`: how the D gradients are pulled back.
#   One forward over the whole batch, D cotangent rows pulled back through its VJP (exact with
#   cross-example coupling such as batch norm; valid in both settings):
#   "vjp":  vmap of the VJP over the D rows (one batched backward).
#   "loop": D separate backward passes unrolled in the trace (no batched convolutions; the
#           fastest on XLA:CPU for small D, see docs/performance.md).
#   "scan": lax.map over the D rows (compiles one backward; for large D).
#   Each gradient through its own forward (exact only without cross-example coupling):
#   "vmap": jax.vmap(jax.grad) over one-example batches (sample-wise only: the sub-batches
#           must have equal sizes); `chunk_size` turns it into lax.map over vmapped chunks.
#   "map":  lax.map of jax.grad over the examples, one at a time (sample-wise only).
#   "segments": the batch is cut at every sub-batch boundary into disjoint segments (6 for
#           D = 4, r = 0.2); each segment gets one forward and backward (together one
#           training step's work instead of one forward + D backwards), and each sub-batch
#           gradient is the weighted sum of its segments' gradients (batch setting only).
#           With batch norm every segment would use its own statistics, which is not the
#           released semantics: refused when the loss reduces over the batch axis.
# `conv`: how convolutions are evaluated (`rewrite_convs`): "none" (as written), "slices"
#   (k×k shifted slices @ kernel) or "im2col" (one matmul on the concatenated slices). Every
#   pullback combines with every conv mode.
# "auto" for either picks the backend's measured default (`default_formulation`).
PULLBACKS = ("vjp", "loop", "scan", "vmap", "map", "segments")
SAMPLE_PULLBACKS = ("vjp", "loop", "scan", "vmap", "map")
SUBBATCH_PULLBACKS = ("vjp", "loop", "scan", "segments")
CONV_MODES = ("slices", "im2col")  # the rewrites of `rewrite_convs`
CONVS = ("none", *CONV_MODES)

# The former single `impl=` string of each setting and the (pullback, conv) pair it meant.
LEGACY_IMPLS = {
  "sample": {
    "vmap": ("vmap", "none"),
    "map": ("map", "none"),
    "vjp": ("vjp", "none"),
    "slices": ("vmap", "slices"),
    "im2col": ("vmap", "im2col"),
  },
  "batch": {
    "vmap": ("vjp", "none"),
    "loop": ("loop", "none"),
    "map": ("scan", "none"),
    "loop_im2col": ("loop", "im2col"),
    "vmap_im2col": ("vjp", "im2col"),
    "segments": ("segments", "none"),
    "segments_im2col": ("segments", "im2col"),
  },
}


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
    `("vmap", "none")` and `("loop", "none")`. The im2col memory guard
    (`IM2COL_MAX_BYTES`) may still chunk the work or, past it, use plain convolutions.
  """
  backend = backend or jax.default_backend()
  pullback = "vmap" if num_chunks is None else "loop"
  return pullback, "im2col" if backend == "cpu" else "none"


def resolve_formulation(
  num_chunks, pullback: str = "auto", conv: str = "auto", impl: str | None = None
) -> tuple[str, str]:
  """The concrete `(pullback, conv)` for a setting, with "auto" resolved and names checked.

  Args:
    num_chunks: None for the sample-wise setting, else D.
    pullback: one of `SAMPLE_PULLBACKS` / `SUBBATCH_PULLBACKS`, or "auto".
    conv: one of `CONVS`, or "auto".
    impl: deprecated single string of earlier versions (`LEGACY_IMPLS`); mapped to the pair
      with a `DeprecationWarning`. Cannot be combined with a non-"auto" pullback or conv.

  Raises:
    ValueError: an unknown name, or a pullback that does not exist in this setting (the
      message names the option and its valid values).
  """
  setting = "sample" if num_chunks is None else "batch"
  if impl is not None:
    legacy = LEGACY_IMPLS[setting]
    errors.check_choice(f"impl ({setting} setting, deprecated)", impl, tuple(legacy))
    if pullback not in ("auto", None) or conv not in ("auto", None):
      raise ValueError(
        f"impl={impl!r} (deprecated) cannot be combined with pullback={pullback!r} / "
        f"conv={conv!r}; pass pullback= and conv= only."
      )
    warnings.warn(
      f"impl={impl!r} is deprecated; use pullback={legacy[impl][0]!r}, conv={legacy[impl][1]!r}.",
      DeprecationWarning,
      stacklevel=3,
    )
    return legacy[impl]
  auto_p, auto_c = default_formulation(num_chunks)
  pullback = auto_p if pullback in ("auto", None) else pullback
  conv = auto_c if conv in ("auto", None) else conv
  valid = SAMPLE_PULLBACKS if num_chunks is None else SUBBATCH_PULLBACKS
  if pullback in PULLBACKS and pullback not in valid:
    where = "sample-wise (num_chunks=None)" if num_chunks is None else "batch"
    raise ValueError(
      f"pullback={pullback!r} does not exist in the {where} setting; valid there: "
      f"{', '.join(valid)}, auto."
    )
  errors.check_choice("pullback", pullback, (*valid, "auto"))
  errors.check_choice("conv", conv, (*CONVS, "auto"))
  return pullback, conv


def auto_subbatch_pullback(loss_fn, params, batch, backend: str | None = None) -> str:
  """The pullback that `pullback="auto"` runs in the batch setting for this loss.

  On CPU, `"segments"` where it is exact (the loss has no cross-example coupling:
  `couples_examples`), because it was measured faster there (docs/performance.md); with
  coupling (batch norm) and on other backends, `default_formulation`'s pullback. Traceable:
  it reads the loss's jaxpr only.
  """
  backend = backend or jax.default_backend()
  default = default_formulation(2, backend)[0]
  if backend != "cpu" or couples_examples(loss_fn, params, batch):
    return default
  return "segments"


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


# The jaxpr-walking helpers, public for the other walkers (`nio_jax.methods.lsuv`):
# the sub-jaxprs of an equation's params, the call primitives whose body is inlined (name ->
# the param holding the body) and the re-binding of one equation to concrete/traced inputs.
sub_jaxprs = _sub_closed_jaxprs
INLINE_CALLS = _INLINE
bind_equation = _bind


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
  matmul form of convolutions where the backend runs it faster (see `default_formulation`).
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


# Memory guard of the im2col form: the patches are k×k times wider than the conv inputs, and
# autodiff keeps them and their cotangents (XLA's temp memory of the ResNet-20 B=32
# batch-setting NIO step was ≈6x the forward patches: 1.3 GB). `plan_formulation` estimates
# the patch bytes alive at once from `im2col_bytes` (P, the forward patches of the whole
# batch):
#   * one forward + D rows pulled back together ("vjp", "loop", "scan"): P·(1 + D);
#   * own forward per example ("vmap", "map"), c examples at a time: 2·P·c/B;
#   * "segments" (one training step's work): 2·P.
# Above this budget the D rows (or the examples) are processed in groups that fit; the row
# groups under `jax.checkpoint` so that the NIO step's second-order pass does not keep every
# group's intermediates (example chunks without it, see `_per_example_selected`); when not
# even one row / example fits, convolutions stay plain. Set to None to disable.
IM2COL_MAX_BYTES: int | None = 8 * 2**30


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


class Plan(NamedTuple):
  """How a formulation runs after the im2col memory guard (`plan_formulation`).

  Attributes:
    pullback: as requested.
    conv: as requested, or "none" when even one row / example of im2col does not fit.
    group: rows ("vjp", "loop", "scan", each group under `jax.checkpoint`) or examples
      ("vmap", "map") processed at a time; None = all at once.
  """

  pullback: str
  conv: str
  group: int | None = None


def plan_formulation(loss_fn, params, batch, num_chunks, pullback, conv) -> Plan:
  """Applies the im2col memory guard (`IM2COL_MAX_BYTES`) to a resolved `(pullback, conv)`."""
  budget = IM2COL_MAX_BYTES
  if conv != "im2col" or budget is None:
    return Plan(pullback, conv)
  b = errors.batch_size(batch)
  patches = im2col_bytes(loss_fn, params, batch)
  if patches == 0:
    return Plan(pullback, conv)
  if pullback == "segments":
    return Plan(pullback, conv if 2 * patches <= budget else "none")
  if pullback in ("vmap", "map"):
    fit = int(b * budget // (2 * patches))  # examples whose patches fit at once
    n = b
  else:
    fit = int(budget // patches) - 1  # rows pulled back together next to the forward
    n = b if num_chunks is None else num_chunks
  if fit >= n:
    return Plan(pullback, conv)
  if fit >= 1:
    return Plan(pullback, conv, fit)
  return Plan(pullback, "none")


# Reductions that, over the batch axis, couple the examples (batch norm's statistics).
_REDUCTIONS = (
  "reduce_sum",
  "reduce_max",
  "reduce_min",
  "reduce_prod",
  "reduce_and",
  "reduce_or",
  "argmax",
  "argmin",
)


def _batch_reductions(jaxpr, b: int, path=()) -> set:
  found = set()
  for k, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name in _REDUCTIONS:
      aval = eqn.invars[0].aval
      if 0 in tuple(eqn.params.get("axes", ())) and aval.ndim and aval.shape[0] == b:
        found.add((*path, k))
    for j, sub in enumerate(_sub_closed_jaxprs(eqn.params)):
      found |= _batch_reductions(sub, b, (*path, k, j))
  return found


def couples_examples(loss_fn: LossFn, params: PyTree, batch: PyTree) -> bool:
  """Whether `loss_fn` reduces over the batch axis (cross-example coupling, e.g. batch norm).

  Found from the jaxpr, without running the model: a reduction over axis 0 of an operand
  whose leading size follows the batch size (traced at B and at B + 1, so that a parameter
  that happens to have B rows is not mistaken for the batch).
  """
  b = errors.batch_size(batch)
  wider = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype), batch
  )
  at_b = _batch_reductions(jax.make_jaxpr(loss_fn)(params, batch).jaxpr, b)
  if not at_b:
    return False
  return bool(at_b & _batch_reductions(jax.make_jaxpr(loss_fn)(params, wider).jaxpr, b + 1))


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


def _per_example_selected(loss_fn, params, batch, wrt, pullback, conv, chunk_size):
  plan = plan_formulation(loss_fn, params, batch, None, pullback, conv)
  if plan.conv != "none":
    loss_fn = rewrite_convs(loss_fn, plan.conv)
  sel, rebuild, _ = select_leaves(params, wrt)
  b = errors.batch_size(batch)
  # Sample-wise chunks are not rematerialised: with the XLA:CPU YNN fusions
  # (`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce`, once `nio_jax.xla_defaults`)
  # the second-order gradient through a `jax.checkpoint`ed chunk inside `lax.map` came out
  # wrong (up to 0.18 absolute on the tests' tiny net in float64), while the same chunks
  # without remat, or with the fusions off, are exact.
  group, remat = chunk_size, False
  if plan.group is not None and (group is None or plan.group < group):
    group = plan.group

  if pullback in ("vjp", "loop", "scan"):
    w = jnp.eye(b, dtype=jnp.float32)
    return _pullback_rows(lambda s: loss_fn(rebuild(s), batch), sel, w, pullback, group, remat)

  def loss_sel(sel_leaves, example):
    return _single_loss(loss_fn, rebuild(sel_leaves), example)

  g1 = jax.value_and_grad(loss_sel)
  batch1 = jax.tree_util.tree_map(lambda x: x[:, None], batch)  # [B, 1, ...]
  if pullback == "map":
    one = lambda ex1: jax.lax.map(lambda ex: g1(sel, ex), ex1)
  else:  # "vmap"
    one = lambda ex1: jax.vmap(g1, in_axes=(None, 0))(sel, ex1)
  return _in_groups(one, batch1, group, remat)


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


@functools.partial(jax.jit, static_argnames=("loss_fn", "pullback", "conv", "chunk_size", "wrt"))
@canonical_convs
def _per_example_grads_jit(loss_fn, params, batch, pullback, conv, chunk_size, wrt):
  _, sel_grads = _per_example_selected(loss_fn, params, batch, wrt, pullback, conv, chunk_size)
  return sel_grads


def per_example_grads(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  *,
  pullback: str | None = None,
  conv: str | None = None,
  chunk_size: int | None = None,
  wrt: Callable[[tuple, Any], bool] | None = None,
  impl: str | None = None,
) -> PyTree:
  """Per-example gradients `∇θ ℓ_i(θ)`, a pytree like `params` with a leading batch axis.

  Computed under `jit`, by default with `vmap(grad)` over one-example batches.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: pytree of float arrays.
    batch: pytree of arrays with a shared leading batch axis `B`.
    pullback: one of `SAMPLE_PULLBACKS` or "auto" (see the top of this module); None =
      "vmap".
    conv: one of `CONVS` or "auto"; None = "none".
    chunk_size: if set, examples (or cotangent rows) are processed `chunk_size` at a time
      (`lax.map` over `vmap`).
    wrt: optional predicate `(path, leaf) -> bool`; leaves it rejects get no gradient and
      are returned as zeros.
    impl: deprecated single-string form (`LEGACY_IMPLS["sample"]`); use pullback/conv.

  Returns:
    A pytree with the structure of `params`; every leaf has shape `[B, *leaf.shape]`.

  Raises:
    ValueError: an unknown or invalid pullback / conv, or a bad chunk_size.
  """
  if impl is None:
    pullback, conv = resolve_formulation(None, pullback or "vmap", conv or "none")
  else:
    pullback, conv = resolve_formulation(None, pullback, conv, impl)
  errors.check_params(params)
  b = errors.check_batch(batch, minimum=1)
  if chunk_size is not None and (chunk_size < 1 or chunk_size > b):
    raise ValueError(f"chunk_size={chunk_size} must be in [1, batch size {b}].")
  check_loss_fn(loss_fn, params, batch)
  sel_grads = _per_example_grads_jit(loss_fn, params, batch, pullback, conv, chunk_size, wrt)
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


def check_segments(loss_fn, params, batch) -> None:
  """Refuses `pullback="segments"` for a loss that couples the examples (batch norm).

  Raises:
    ValueError: `couples_examples` found a reduction over the batch axis.
  """
  if couples_examples(loss_fn, params, batch):
    raise ValueError(
      "pullback='segments' is exact only for models without cross-example coupling, and "
      "loss_fn reduces over the batch axis (batch norm?): each segment would use its own "
      "statistics. Use pullback='loop', 'vjp' or 'scan' (one forward over the whole batch)."
    )


def subbatch_grads_selected(
  loss_fn, params, batch, num_chunks, overlap, wrt=None, pullback="loop", conv="none"
):
  """(losses [B], sub-batch gradients of the selected leaves as `[D, ...]` arrays).

  `pullback` / `conv` are resolved names (`resolve_formulation`); traceable.
  """
  if pullback == "segments":
    check_segments(loss_fn, params, batch)
  plan = plan_formulation(loss_fn, params, batch, num_chunks, pullback, conv)
  if plan.conv != "none":
    loss_fn = rewrite_convs(loss_fn, plan.conv)
  sel, rebuild, _ = select_leaves(params, wrt)
  b = errors.batch_size(batch)
  if pullback == "segments":
    return _segment_grads(loss_fn, sel, rebuild, batch, num_chunks, overlap)
  w = subbatch_weights(b, num_chunks, overlap, np.float64)  # cast to the losses' dtype later
  f = lambda s: loss_fn(rebuild(s), batch)
  return _pullback_rows(f, sel, w, pullback, plan.group, plan.group is not None)


def sample_grads_selected(
  loss_fn, params, batch, wrt=None, pullback="vmap", conv="none", chunk_size=None
):
  """(losses [B], per-example gradients of the selected leaves as `[B, ...]` arrays).

  `pullback` / `conv` are resolved names (`resolve_formulation`); traceable.
  """
  return _per_example_selected(loss_fn, params, batch, wrt, pullback, conv, chunk_size)
