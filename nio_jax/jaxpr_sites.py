"""The one jaxpr walker that follows parameter leaves to the operations that use them.

`pullback="norms"` / `"sites"` (`nio_jax.per_example_norms`) and LSUV (`nio_jax.methods.lsuv`)
both read a loss's jaxpr for the places where a parameter leaf, possibly seen through views
(reshape, transpose, dtype cast, ...), enters an operation with the inputs: a *site*. Both
walk the jaxpr the same way, and `Walker` is that walk:

* variables carry a *tag* (None: nothing tracked). A `LeafRef` tags a view of a parameter leaf:
  a single-input view operation (`Walker.views`) extends its `chain`;
* a call (`jaxpr_rewrites.INLINE_CALLS`: jit, remat, custom_jvp/vjp) with a tagged input is
  walked inside, its body's arguments and results keeping their tags; `path` addresses an
  equation by its index in each enclosing body;
* an equation without a tagged input is evaluated (`jaxpr_rewrites.bind_equation`), or skipped
  when the walker only reads the jaxpr (`evaluate=False`: every value is None);
* literals have no tag and their value inline; dropped outputs are not stored.

Every other equation with a tagged input goes to `Walker.other`, where the two users differ:
which equations are sites, and what any other use of a leaf means. `per_example_norms`
refuses it (its sums are exact only when every use of a selected leaf is a site) and walks
`scan` bodies with their stacked leaves one slice per step; LSUV allows it (a leaf used
elsewhere, e.g. an embedding lookup, is only remembered in a second kind of tag, to find tied
weights), pairs a layer with the bias added to its output (`Walker.equation` sees every
equation first) and refuses a layer inside a scan. Those rules stay in their modules.

Reads JAX's internal jaxpr (`jaxpr_rewrites.check_jaxpr_internals`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nio_jax.jaxpr_rewrites import INLINE_CALLS, bind_equation


@dataclasses.dataclass(frozen=True)
class LeafRef:
  """A value derived from parameter leaf `leaf`: `view(leaf[i_1, ..., i_k])`.

  Attributes:
    leaf: the leaf's index (in the walker's user's order).
    chain: the view equations applied, in order (after slicing).
    stack: the scan lengths it is sliced by, outermost first (`per_example_norms` only).
  """

  leaf: int
  chain: tuple = ()
  stack: tuple[int, ...] = ()


def is_literal(v) -> bool:
  """Whether jaxpr variable `v` is a literal (its value inline, no tag)."""
  return type(v).__name__ == "Literal"


def inline_body(eqn) -> tuple[Any, tuple] | None:
  """`(body jaxpr, its consts)` of a call equation that walkers inline, else None."""
  name = eqn.primitive.name
  if name not in INLINE_CALLS or INLINE_CALLS[name] not in eqn.params:
    return None
  body = eqn.params[INLINE_CALLS[name]]
  return getattr(body, "jaxpr", body), getattr(body, "consts", ())


class Walker:
  """Walks a jaxpr, following `LeafRef`s through views and calls (see the module docstring).

  Subclasses give `other` (an equation with a tagged input that is neither a view of a leaf
  nor an inlined call) and may override `equation`, which sees every equation first.
  """

  #: The single-input operations that only change how a leaf is viewed.
  views: frozenset = frozenset()
  #: Whether equations are evaluated (values) or the jaxpr only read (every value None).
  evaluate: bool = True

  def walk(self, jaxpr, consts, args, tags, path=()) -> tuple[list, list]:
    """`(outputs, their tags)` of `jaxpr` on `args` (tagged `tags`); `path` addresses it."""
    env, tag_of = {}, {}

    def read(v):
      return v.val if is_literal(v) else env[v]

    def tag(v):
      return None if is_literal(v) else tag_of.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a, t in zip(jaxpr.invars, args, tags):
      env[v] = a
      if t is not None:
        tag_of[v] = t
    for k, eqn in enumerate(jaxpr.eqns):
      inv = [read(v) for v in eqn.invars]
      outs, out_tags = self.equation(eqn, inv, [tag(v) for v in eqn.invars], (*path, k))
      for v, o, t in zip(eqn.outvars, outs, out_tags):
        if type(v).__name__ != "DropVar":
          env[v] = o
          if t is not None:
            tag_of[v] = t
    return [read(v) for v in jaxpr.outvars], [tag(v) for v in jaxpr.outvars]

  def equation(self, eqn, inv, in_tags, here) -> tuple[list, list]:
    """`(outputs, their tags)` of one equation at address `here`."""
    if all(t is None for t in in_tags):
      return self.bind(eqn, inv), [None] * len(eqn.outvars)
    if eqn.primitive.name in self.views and len(inv) == 1 and isinstance(in_tags[0], LeafRef):
      r = in_tags[0]
      return self.bind(eqn, inv), [dataclasses.replace(r, chain=(*r.chain, eqn))]
    if inline_body(eqn) is not None:
      return self.call(eqn, inv, in_tags, here)
    return self.other(eqn, inv, in_tags, here)

  def bind(self, eqn, inv) -> list:
    """The equation's outputs (Nones when the walker only reads the jaxpr)."""
    if not self.evaluate:
      return [None] * len(eqn.outvars)
    return bind_equation(eqn, inv)

  def call(self, eqn, inv, in_tags, here) -> tuple[list, list]:
    """A call walked inside: its body on the call's trailing arguments, tags kept."""
    body, consts = inline_body(eqn)
    n = len(inv) - len(body.invars)
    return self.walk(body, consts, inv[n:], in_tags[n:], here)

  def other(self, eqn, inv, in_tags, here) -> tuple[list, list]:
    """Any other equation with a tagged input: the subclass's rules."""
    raise NotImplementedError
