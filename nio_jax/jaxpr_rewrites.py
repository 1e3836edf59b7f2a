"""Reads and rewrites the jaxpr of a user's loss function; the model itself is never touched.

* `rewrite_convs`: every convolution evaluated as shifted slices (or im2col) @ kernel, for
  backends that run matmuls faster than the convolutions of second-order autodiff;
* `canonical_convs`: every convolution in the canonical NHWC / HWIO layout that XLA:CPU's
  fast kernel needs (the backward convolutions of a scanned stack are not);
* `im2col_bytes`: the bytes of the patches `rewrite_convs(fn, "im2col")` would build;
* `couples_examples`: whether a loss reduces over the batch axis (batch norm);
* `sub_jaxprs`, `INLINE_CALLS`, `bind_equation`: the helpers of every jaxpr walker here and in
  `nio_jax.jaxpr_sites` (the walker `per_example_norms` and LSUV share).

These read JAX's internal jaxpr, which changes between releases: `check_jaxpr_internals`
admits the tested releases only.
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

from nio_jax import checks

PyTree = Any

CONV_MODES = ("slices", "im2col")  # the rewrites of `rewrite_convs`

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


# The arguments of `lax.conv_general_dilated`, as a `conv_general_dilated` equation names them.
_CONV_ARGS = (
  "window_strides",
  "padding",
  "lhs_dilation",
  "rhs_dilation",
  "dimension_numbers",
  "feature_group_count",
  "batch_group_count",
  "precision",
  "preferred_element_type",
)


def _lax_conv(lhs, rhs, params: dict, **changes):
  """`lax.conv_general_dilated(lhs, rhs, ...)` with `params` (an equation's; other keys are
  ignored) and `changes` replacing some of them."""
  kwargs = {k: params[k] for k in _CONV_ARGS if k in params} | changes
  return jax.lax.conv_general_dilated(lhs, rhs, **kwargs)


def conv_as_matmul(lhs, rhs, *, mode: str = "im2col", **params):
  """`lax.conv_general_dilated` evaluated as slices/im2col @ kernel (exactly the same sums).

  Args:
    lhs, rhs: the convolution's input and kernel.
    mode: "slices" (one matmul per kernel offset) or "im2col" (one matmul on the
      concatenated slices).
    **params: the keyword arguments of `lax.conv_general_dilated` (an equation's params).

  Returns:
    The convolution's output. Grouped or input-dilated convolutions, and string paddings,
    fall back to the convolution itself.
  """
  window_strides, padding = params["window_strides"], params["padding"]
  precision = params.get("precision")
  preferred_element_type = params.get("preferred_element_type")
  nsp = lhs.ndim - 2
  lhs_dilation = tuple(params.get("lhs_dilation") or (1,) * nsp)
  rhs_dilation = tuple(params.get("rhs_dilation") or (1,) * nsp)
  if (
    params.get("feature_group_count", 1) != 1
    or params.get("batch_group_count", 1) != 1
    or any(d != 1 for d in lhs_dilation)
    or isinstance(padding, str)
  ):
    return _lax_conv(lhs, rhs, params)
  ls, rs, os_ = params["dimension_numbers"]
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


def sub_jaxprs(params: dict):
  """Yields the jaxprs in an equation's `params` (the bodies of jit, scan, custom_* calls)."""
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
    if any(_has_conv(j) for j in sub_jaxprs(eqn.params)):
      return True
  return False


# The call primitives whose body a walker inlines: primitive name -> the param holding the body.
INLINE_CALLS = {
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


def bind_equation(eqn, inv: list) -> list:
  """Binds equation `eqn`'s primitive to the (concrete or traced) inputs `inv`; its outputs."""
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
    elif not any(_has_conv(j) for j in sub_jaxprs(eqn.params)):
      outs = bind_equation(eqn, inv)
    elif name in INLINE_CALLS and INLINE_CALLS[name] in eqn.params:
      sub = eqn.params[INLINE_CALLS[name]]
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
    elif name == "cond" and set(eqn.params) == {"branches"}:  # GradInit's two branches
      # (a platform-dependent `cond`, with `branches_platforms`, is kept as it is)
      branches = [
        lambda *ops, b=b: _eval_rewritten(b.jaxpr, b.consts, list(ops), mode)
        for b in eqn.params["branches"]
      ]
      outs = jax.lax.switch(inv[0], branches, *inv[1:])
    else:  # a control-flow primitive we do not rewrite: keep its convolutions
      outs = bind_equation(eqn, inv)
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
  matmul form of convolutions where the backend runs it faster (see
  `nio_jax.formulation.default_formulation`).
  """
  checks.check_choice("mode", mode, CONV_MODES)
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


def canonical_conv(lhs, rhs, **params):
  """`lax.conv_general_dilated` computed in canonical dimension numbers.

  The operands are transposed to (N, spatial..., C) and (spatial..., I, O), the convolution
  runs in NHWC / HWIO -> NHWC, and the output is transposed back: the same convolution.
  Already canonical operands are used as they are (no transposes).

  Args:
    lhs, rhs: the convolution's input and kernel.
    **params: the keyword arguments of `lax.conv_general_dilated` (an equation's params);
      `dimension_numbers` is required.
  """
  ls, rs, os_ = params["dimension_numbers"]
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
  y = _lax_conv(x, w, params, dimension_numbers=dn)
  if out_perm == identity:
    return y
  return jnp.transpose(y, tuple(int(i) for i in np.argsort(out_perm)))


def canonical_convs(fn: Callable, backends: tuple[str, ...] | None = ("cpu",)) -> Callable:
  """`fn` with every convolution computed in canonical dimension numbers (`canonical_conv`).

  Apply it to the *differentiated* function, outside every `jax.grad` / `jax.vjp` /
  `jax.jvp` and just inside `jax.jit` (e.g. `jax.jit(canonical_convs(train_step))`): the
  convolutions that need it are the ones autodiff creates. The values are the same
  convolutions (same sums, same order of XLA's library kernel); only operand layouts change.
  Recurses into jit, `scan` (flax `nn.scan`), `cond` (`lax.cond` / `lax.switch`) and
  custom_jvp/vjp bodies; convolutions inside `while_loop` bodies are kept as they are.

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
      for sub in sub_jaxprs(eqn.params):
        total += walk(sub, m)
    return total

  return walk(closed.jaxpr, 1)


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
    for j, sub in enumerate(sub_jaxprs(eqn.params)):
      found |= _batch_reductions(sub, b, (*path, k, j))
  return found


def couples_examples(loss_fn: Callable, params: PyTree, batch: PyTree) -> bool:
  """Whether `loss_fn` reduces over the batch axis (cross-example coupling, e.g. batch norm).

  Found from the jaxpr, without running the model: a reduction over axis 0 of an operand
  whose leading size follows the batch size (traced at B and at B + 1, so that a parameter
  that happens to have B rows is not mistaken for the batch).
  """
  b = checks.batch_size(batch)
  wider = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype), batch
  )
  at_b = _batch_reductions(jax.make_jaxpr(loss_fn)(params, batch).jaxpr, b)
  if not at_b:
    return False
  return bool(at_b & _batch_reductions(jax.make_jaxpr(loss_fn)(params, wider).jaxpr, b + 1))
