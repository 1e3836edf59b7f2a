"""GradCosine from each layer's inputs and output cotangents: `pullback="norms"` and `"sites"`.

GradCosine needs only the per-example gradient norms `n_i = ‖g_i‖` and the sum of the unit
vectors `S = Σ_i g_i / n_i` (`nio_jax.cosine`: `GC = (‖S‖² − B) / (B(B − 1))`). Neither needs
the `B × P` stack of per-example gradients that `vmap(grad)` builds.

How (`unit_sum`):
1. The loss's jaxpr is evaluated once with a zero perturbation added to the output of every
   *site*: an operation `y = op(x, W)` that is linear (or affine) in a selected parameter
   leaf `W`, with the examples on axis 0 of `x` and `y` (dense and convolution layers, bias
   adds, layer-norm scales; also inside `scan` bodies, whose stacked leaves are used one slice
   per step). One VJP of the summed losses gives every site's output cotangent `b`; because
   the examples do not interact, `b_i` is `∂ℓ_i/∂y_i`. The site inputs `x` are kept from the
   same forward.
2. Each site's contribution to `n_i²` is `‖g_i‖²` with `g_i = ∂ℓ_i/∂W`, from `x_i` and `b_i`
   alone:
   * for a matmul site `y_i = x_i W` with `x_i: T×d`, `b_i: T×p`, either the *ghost norm*
     `⟨x_i x_iᵀ, b_i b_iᵀ⟩` (T²(d + p) work, no d×p tensor; Goodfellow 2015, Li et al. 2021)
     when `T(d + p) < d·p`, or the norm of the materialised `x_iᵀ b_i`;
   * any other site: the per-example weight gradient of that one operation (`vmap` of its
     VJP).
   The materialised per-example gradients are kept for step 3 (one weight product per layer
   instead of two), so only the ghost sites save memory.
   A leaf used by one site (or one slice per scan step) has `n_i² = Σ_sites`, exactly.
3. `S`: for a materialised site, `Σ_i g_i / n_i` of the per-example gradients step 2 built;
   for a ghost site, the weight VJP of the whole batch with the cotangents `b_i / n_i` (one
   weight-gradient product). No second backward through the network.

The same sites give the batch setting's sub-batch gradients without a forward per segment
(`segment_sums`, `pullback="sites"`): a segment's summed gradient is each site's weight
gradient on the segment's slices `x[a:e]`, `b[a:e]`, so all segments share the one forward
and backward of step 1.

Everything is ordinary differentiable JAX (no `custom_vjp`, nothing detached), so the NIO
search differentiates GC with respect to the scales through it, second order included, and
forward-over-reverse products work.

Guarantees: exact (same sums as `vmap(grad)`, up to float summation order) for every loss
whose selected leaves are all used as sites. `plan` refuses, with a `NormsUnsupported` that
names the leaf and the operation, a loss that couples the examples (batch norm), a leaf that
is used twice (tied weights, a leaf broadcast over the steps of a scan), or used by an
operation that is not a site; `formulation.resolve_formulation` then falls back to the
per-example gradients where "auto" asked for this form.

The sites are found by `nio_jax.jaxpr_sites.Walker` (the walk LSUV shares: views, calls,
literals); which operations are sites, the refusals and the scans are this module's.
Reads JAX's internal jaxpr like `nio_jax.jaxpr_rewrites` (`check_jaxpr_internals`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks, jaxpr_rewrites, jaxpr_sites

PyTree = Any


class NormsUnsupported(ValueError):
  """The loss cannot be evaluated by `pullback="norms"` (the message says which leaf and why)."""


# Unary operations that only change how a leaf is viewed; the first three keep its norm.
_NORM_PRESERVING_VIEWS = ("reshape", "transpose", "convert_element_type", "squeeze", "copy")
_VIEWS = (*_NORM_PRESERVING_VIEWS, "broadcast_in_dim", "expand_dims")
# Operations that are linear (affine for add/sub) in one operand.
_SITES = ("dot_general", "conv_general_dilated", "mul", "add", "sub")
# What a refusal suggests instead: the same quantities through each example's (or
# segment's) own forward.
_ALTERNATIVE = {"norms": "vmap", "sites": "segments"}


# A value derived from a selected leaf: `view(leaf[i_1, ..., i_k])` for scan steps i.
_Ref = jaxpr_sites.LeafRef


@dataclasses.dataclass(frozen=True)
class _Site:
  """One site `y = eqn(x, view(leaf slice))` (see the module docstring)."""

  leaf: int
  stack: tuple[int, ...]
  chain: tuple
  eqn: Any
  w_pos: int  # operand position of the leaf-derived operand
  slice_aval: Any  # the leaf slice's shape/dtype
  x_aval: Any
  y_aval: Any

  def apply(self, x, w):
    """The site's output for input `x` and leaf slice `w`."""
    for e in self.chain:
      (w,) = jaxpr_rewrites.bind_equation(e, [w])
    ops = [x, x]
    ops[self.w_pos] = w
    return jaxpr_rewrites.bind_equation(self.eqn, ops)[0]

  def weight_vjp(self, x, b):
    """`∂⟨b, apply(x, w)⟩/∂w`, the leaf-slice gradient of the site for cotangent `b`."""
    w0 = jnp.zeros(self.slice_aval.shape, self.slice_aval.dtype)
    return jax.vjp(lambda w: self.apply(x, w), w0)[1](b.astype(self.y_aval.dtype))[0]

  def matmul_dims(self):
    """`(T, d, p, x permutation)` when the site is `x @ W` with a norm-keeping view, else None.

    (`_Walker.site_of` admits a `dot_general` site only as `x @ W` without batch dimensions
    and with the examples not contracted.)
    """
    if self.eqn.primitive.name != "dot_general":
      return None
    if any(e.primitive.name not in _NORM_PRESERVING_VIEWS for e in self.chain):
      return None
    (lc, _), _ = self.eqn.params["dimension_numbers"]
    xs = self.x_aval.shape
    free = [a for a in range(len(xs)) if a not in lc]
    t = int(np.prod([xs[a] for a in free[1:]]))
    d = int(np.prod([xs[a] for a in lc]))
    p = int(np.prod(self.y_aval.shape)) // (xs[0] * t)
    return t, d, p, (*free, *lc)


def uses_ghost_norm(site: _Site) -> bool:
  """Whether the site's norms are ghost norms (a matmul with T(d + p) < d·p) or materialised."""
  dims = site.matmul_dims()
  if dims is None:
    return False
  t, d, p, _ = dims
  return t * (d + p) < d * p  # FLOPs of the ghost norm against the materialised gradient


def _ghost_sq_norms(site: _Site, x, b):
  """`[B]`: ‖∂ℓ_i/∂(leaf slice)‖² of one (unstacked) matmul site, by its ghost norm."""
  acc = jnp.promote_types(site.y_aval.dtype, jnp.float32)
  n = x.shape[0]
  t, d, p, perm = site.matmul_dims()
  xr = jnp.reshape(jnp.transpose(x, perm), (n, t, d)).astype(acc)
  br = jnp.reshape(b, (n, t, p)).astype(acc)
  if t == 1:
    return jnp.sum(xr[:, 0] ** 2, -1) * jnp.sum(br[:, 0] ** 2, -1)
  gram_x = jnp.einsum("btd,bsd->bts", xr, xr)
  gram_b = jnp.einsum("btp,bsp->bts", br, br)
  return jnp.sum(gram_x * gram_b, axis=(1, 2))


def _per_example_grads(site: _Site, x, b):
  """`[B, *slice]`: the per-example leaf-slice gradients of one (unstacked) site."""
  acc = jnp.promote_types(site.y_aval.dtype, jnp.float32)
  return jax.vmap(lambda xi, bi: site.weight_vjp(xi[None], bi[None]))(x, b).astype(acc)


def _over_stack(fn, depth, *args):
  for _ in range(depth):
    fn = jax.vmap(fn)
  return fn(*args)


@dataclasses.dataclass
class _Frame:
  """The sites of one jaxpr being walked (the loss's, or a scan body's; a call's sites are its
  caller's): `perts[k]` the k-th site's perturbation (None when planning, `plan` then
  collects them), `acts` the site inputs, in walk order."""

  perts: Any
  plan: Any
  acts: list = dataclasses.field(default_factory=list)
  k: int = 0


class _Walker(jaxpr_sites.Walker):
  """Evaluates a jaxpr with the sites' perturbations added (or, planning, finds the sites)."""

  views = frozenset(_VIEWS)

  def __init__(self, batch_size: int, names: list[str], slice_aval: dict, pullback: str):
    self.b = batch_size
    self.pullback = pullback  # the pullback that plans, for messages
    self.names = names  # the selected leaves' paths, for messages
    self.slice_aval = slice_aval  # (leaf, stack) -> the shape/dtype of one slice
    self.used = {}  # (leaf, stack) -> the site equation that uses it
    self.frames: list[_Frame] = []

  def unsupported(self, ref: _Ref, what: str):
    return NormsUnsupported(
      f"pullback={self.pullback!r} cannot use parameter leaf {self.names[ref.leaf]}: {what}. "
      f"Use pullback={_ALTERNATIVE[self.pullback]!r} for this model."
    )

  def check_no_refs(self, refs, what: str):
    for r in refs:
      if r is not None:
        raise self.unsupported(r, what)

  def site_of(self, eqn, refs, avals):
    """The operand position of the leaf-derived operand if `eqn` is a site, else None."""
    name = eqn.primitive.name
    pos = [i for i, r in enumerate(refs) if r is not None]
    if name not in _SITES or len(pos) != 1 or len(eqn.invars) != 2:
      return None
    w_pos = pos[0]
    x_aval, y_aval = avals[1 - w_pos], eqn.outvars[0].aval
    if not x_aval.shape or x_aval.shape[0] != self.b or not y_aval.shape:
      return None
    if y_aval.shape[0] != self.b:
      return None
    if name == "sub" and w_pos == 1:
      return None  # x - W: affine with a sign; keep it simple and refuse
    if name == "dot_general":  # x @ W, no batch dimensions, the examples not contracted
      (lc, _), (lb, rb) = eqn.params["dimension_numbers"]
      if w_pos != 1 or lb or rb or 0 in lc:
        return None
    if name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      if w_pos != 1 or dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0:
        return None
      if eqn.params.get("batch_group_count", 1) != 1:
        return None
    return w_pos

  def run(self, jaxpr, consts, args, refs_in, perts, plan):
    """(outputs, activations, output refs) of `jaxpr`; `perts`/`plan` follow the sites in
    walk order.

    `perts` is None when planning: zeros are added and each site's `_Site` (or, for a scan,
    `("scan", length, [its sites])`) is appended to `plan`. Otherwise `perts[k]` is the k-th
    entry's perturbation (a list for a scan, stacked over its steps).
    """
    frame = _Frame(perts, plan)
    self.frames.append(frame)
    try:
      outs, out_refs = self.walk(jaxpr, consts, args, refs_in)
    finally:
      self.frames.pop()
    return outs, frame.acts, out_refs

  def other(self, eqn, inv, in_refs, here):
    """A site (its perturbation added), a scan (walked per step), or a refusal."""
    f = self.frames[-1]
    name = eqn.primitive.name
    if (w_pos := self.site_of(eqn, in_refs, [v.aval for v in eqn.invars])) is not None:
      r = in_refs[w_pos]
      if self.used.setdefault((r.leaf, r.stack), eqn) is not eqn:
        raise self.unsupported(r, "it is used by more than one operation (shared weights)")
      outs = jaxpr_rewrites.bind_equation(eqn, inv)
      if f.perts is None:
        f.plan.append(
          _Site(
            r.leaf,
            r.stack,
            r.chain,
            eqn,
            w_pos,
            self.slice_aval[r.leaf, r.stack],
            eqn.invars[1 - w_pos].aval,
            eqn.outvars[0].aval,
          )
        )
        outs = [outs[0] + jnp.zeros_like(outs[0])]
      else:
        outs = [outs[0] + f.perts[f.k].astype(outs[0].dtype)]
      f.acts.append(inv[1 - w_pos])
      f.k += 1
      return outs, [None] * len(eqn.outvars)
    if name == "scan":
      outs, scan_acts = self.scan(
        eqn, inv, in_refs, None if f.perts is None else f.perts[f.k], f.plan
      )
      f.acts.append(scan_acts)
      f.k += 1
      return outs, [None] * len(eqn.outvars)
    r = next(r for r in in_refs if r is not None)
    raise self.unsupported(
      r, f"it is used by `{name}`, which is not a site (dense, conv, bias add, scale)"
    )

  def scan(self, eqn, inv, in_refs, perts, plan):
    p = eqn.params
    nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
    self.check_no_refs(in_refs[:nc], "a scan uses it at every step (shared over the steps)")
    self.check_no_refs(in_refs[nc : nc + ncar], "it is carried through a scan")
    body_refs = list(in_refs[: nc + ncar])
    for r in in_refs[nc + ncar :]:
      if r is not None and r.chain:
        raise self.unsupported(r, "a scan slices a view of it (reshape before the scan)")
      if r is not None:
        r = dataclasses.replace(r, stack=(*r.stack, length))
        slice_shape = self.slice_aval[r.leaf, r.stack[:-1]]
        self.slice_aval[r.leaf, r.stack] = jax.ShapeDtypeStruct(
          slice_shape.shape[1:], slice_shape.dtype
        )
      body_refs.append(r)
    sc, carry0, xs = inv[:nc], inv[nc : nc + ncar], inv[nc + ncar :]
    cj = p["jaxpr"]
    holder = {}

    def body(carry, x):
      xv, pv = x
      sub_plan = [] if perts is None else None
      outs, acts, out_refs = self.run(
        cj.jaxpr, cj.consts, [*sc, *carry, *xv], body_refs, pv, sub_plan
      )
      self.check_no_refs(out_refs, "a scan returns it")
      holder["plan"] = sub_plan
      return list(outs[:ncar]), (list(outs[ncar:]), acts)

    carry, (ys, acts) = jax.lax.scan(
      body,
      list(carry0),
      (list(xs), perts),
      length=length,
      reverse=p["reverse"],
      unroll=p["unroll"],
    )
    if perts is None:
      plan.append(("scan", length, holder["plan"]))
    return [*carry, *ys], acts


def _zeros_like_plan(plan, stack=()):
  out = []
  for entry in plan:
    if isinstance(entry, _Site):
      out.append(jnp.zeros((*stack, *entry.y_aval.shape), entry.y_aval.dtype))
    else:
      _, length, sub = entry  # ("scan", length, its sites)
      out.append(_zeros_like_plan(sub, (*stack, length)))
  return out


def _flat_sites(plan, acts, cots):
  """(site, x, b) for every site, with the scan steps as leading axes of x and b."""
  for entry, a, c in zip(plan, acts, cots):
    if isinstance(entry, _Site):
      yield entry, a, c
    else:
      yield from _flat_sites(entry[2], a, c)


def plan(loss_fn, sel, rebuild, batch, pullback="norms"):
  """Finds the sites of `loss_fn` for the selected leaves (traceable: reads shapes only).

  Returns `(closed jaxpr, walker, input refs, sites)` for `unit_sum`. `pullback` ("norms"
  or "sites") is the name the messages give.

  Raises:
    NormsUnsupported: the loss couples the examples, or a selected leaf is not used as
      exactly one site (see the module docstring); the message names the leaf.
  """
  jaxpr_rewrites.check_jaxpr_internals()
  params = rebuild(sel)
  if jaxpr_rewrites.couples_examples(loss_fn, params, batch):
    raise NormsUnsupported(
      f"pullback={pullback!r} needs per-example losses that do not interact, and loss_fn "
      "reduces over the batch axis (batch norm?); use pullback='vjp' or 'loop' (one forward "
      "over the whole batch)."
    )
  b = checks.batch_size(batch)
  f = lambda s, bt: loss_fn(rebuild(s), bt)
  closed = jax.make_jaxpr(f)(sel, batch)
  n_sel = len(sel)
  paths = _leaf_names(params, sel)
  walker = _Walker(b, paths, {(i, ()): _aval(x) for i, x in enumerate(sel)}, pullback)
  refs = [_Ref(i) for i in range(n_sel)] + [None] * (len(closed.jaxpr.invars) - n_sel)
  found = []

  def trace(*args):
    outs, _, out_refs = walker.run(closed.jaxpr, closed.consts, list(args), refs, None, found)
    walker.check_no_refs(out_refs, "the loss returns it")
    return outs

  jax.eval_shape(trace, *map(_aval, jax.tree_util.tree_leaves((sel, batch))))
  return closed, walker, refs, found


def _aval(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _leaf_names(params, sel):
  ids = {id(x): i for i, x in enumerate(sel)}
  names = [f"#{i}" for i in range(len(sel))]
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if id(leaf) in ids:
      names[ids[id(leaf)]] = jax.tree_util.keystr(path)
  return names


def _sites_with_cotangents(loss_fn, sel, rebuild, batch, pullback):
  """`(losses [B], [(site, x, b)])`: every site's input and output cotangent, one forward and
  one backward of the summed losses (`b_i = ∂ℓ_i/∂y_i`; see `plan` for what is refused)."""
  closed, walker, refs, found = plan(loss_fn, sel, rebuild, batch, pullback)
  args = jax.tree_util.tree_leaves((sel, batch))

  def tapped(perts):
    outs, acts, _ = walker.run(closed.jaxpr, closed.consts, args, refs, perts, None)
    return outs[0], acts

  losses, pull, acts = jax.vjp(tapped, _zeros_like_plan(found), has_aux=True)
  (cots,) = pull(jnp.ones_like(losses))
  return losses, list(_flat_sites(found, acts, cots))


def segment_sums(loss_fn, sel, rebuild, batch, segments):
  """`(losses [B], [S, *leaf.shape] per selected leaf)`: each segment's summed gradient.

  Segment `k = (a, e)` gets `Σ_{a ≤ i < e} ∂ℓ_i/∂leaf`, from one forward and one backward
  over the whole batch: each site's weight gradient is taken on the slices `x[a:e]`,
  `b[a:e]` of its input and output cotangent (the site is linear in its leaf, so this is
  the segment's sum exactly). So the segments share one trace of the network instead of one
  forward and backward each (`nio_jax.per_example`'s "segments"), and the work is one
  training step's. Traceable and differentiable (second order included) like `unit_sum`.

  Args:
    loss_fn, sel, rebuild, batch: as in `unit_sum`.
    segments: `[(a, e)]` half-open example ranges that cut `[0, B)` in order.

  Raises:
    NormsUnsupported: see `plan`.
  """
  losses, sites = _sites_with_cotangents(loss_fn, sel, rebuild, batch, "sites")
  sizes = [e - a for a, e in segments]
  if [a for a, _ in segments] != [0, *np.cumsum(sizes)[:-1].tolist()] or sum(sizes) != len(losses):
    raise ValueError(f"segments {segments} do not cut [0, {len(losses)}) in order.")

  def per_segment(site, xx, bb):  # [S, *slice]; lax.split transposes to one concatenate
    parts = zip(jax.lax.split(xx, sizes), jax.lax.split(bb, sizes))
    return jnp.stack([site.weight_vjp(xs, bs) for xs, bs in parts])

  out: list = [None] * len(sel)
  for site, x, b in sites:
    depth = len(site.stack)
    g = _over_stack(lambda xx, bb, site=site: per_segment(site, xx, bb), depth, x, b)
    g = jnp.moveaxis(g, depth, 0)  # [S, *stack, *slice]
    out[site.leaf] = jnp.reshape(g, (len(segments), *jnp.shape(sel[site.leaf])))
  for i, leaf in enumerate(sel):  # a selected leaf the loss does not use
    if out[i] is None:
      out[i] = jnp.zeros((len(segments), *jnp.shape(leaf)), jnp.result_type(leaf))
  return losses, out


def unit_sum(loss_fn, sel, rebuild, batch):
  """`(losses [B], Σ_i u_i per selected leaf, norms [B])` without per-example gradients.

  The sample-wise counterpart of `nio_jax.cosine.unit_sum` over `vmap(grad)`'s gradients:
  same values, traceable and differentiable (second order included) with respect to `sel`.

  Args:
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses (convolutions already in
      the formulation's form).
    sel, rebuild: `nio_jax.per_example.select_leaves`'s selected leaves and rebuild.
    batch: the batch.

  Raises:
    NormsUnsupported: see `plan`.
  """
  losses, sites = _sites_with_cotangents(loss_fn, sel, rebuild, batch, "norms")
  acc = jnp.promote_types(losses.dtype, jnp.float32)
  sq = jnp.zeros(losses.shape, acc)
  grads = {}  # materialised sites: their per-example gradients, [*stack, B, *slice]
  for k, (site, x, b) in enumerate(sites):
    depth = len(site.stack)
    if uses_ghost_norm(site):
      s = _over_stack(lambda xx, bb, site=site: _ghost_sq_norms(site, xx, bb), depth, x, b)
    else:
      g = grads[k] = _over_stack(
        lambda xx, bb, site=site: _per_example_grads(site, xx, bb), depth, x, b
      )
      s = jnp.sum(jnp.reshape(g, (*g.shape[: depth + 1], -1)) ** 2, axis=-1)
    sq = sq + jnp.sum(jnp.reshape(s, (-1, s.shape[-1])), axis=0).astype(acc)
  pos = sq > 0  # cosine.safe_sqrt (cosine imports this module): no NaN in the backward
  norms = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  usum = []
  for k, (site, x, b) in enumerate(sites):
    depth = len(site.stack)
    if k in grads:  # Σ_i g_i / n_i from the gradients already there
      s = jnp.tensordot(grads[k], inv, axes=[[depth], [0]])
    else:  # ghost: one weight VJP of the whole batch with the cotangents b_i / n_i
      scale = lambda bb: bb * jnp.reshape(inv, (-1,) + (1,) * (bb.ndim - 1)).astype(bb.dtype)
      s = _over_stack(lambda xx, bb, site=site: site.weight_vjp(xx, scale(bb)), depth, x, b)
    usum.append(jnp.reshape(s.astype(acc), (-1,)))
  return losses, usum, norms
