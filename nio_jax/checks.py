"""The input checks shared by every public entry point.

Every check raises `ValueError` or `TypeError` (or a subclass from `nio_jax.errors`) whose
message names the offending argument and says how to fix it, so that bad input fails at the
call site instead of deep inside JAX. Value checks (NaN/inf, zero norms) run with numpy on
concrete values only and skip tracers, so the public functions that call them can be used
inside `jax.jit`, `jax.vmap` and `jax.grad`; shape and dtype checks run everywhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax.errors import LossFnError


def batch_size(batch) -> int:
  """Leading-axis size shared by every leaf of `batch`; raises if they disagree."""
  flat = jax.tree_util.tree_leaves(batch)
  if not flat:
    raise ValueError("batch is empty: expected a pytree of arrays with a leading batch axis.")
  sizes = set()
  for leaf in flat:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
        "batch has a scalar leaf; every leaf needs a leading batch axis "
        "(e.g. {'image': [B,H,W,C], 'label': [B]})."
      )
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}.")
  return sizes.pop()


def check_batch(batch, *, minimum: int = 2, what: str = "batch") -> int:
  """The batch size of `batch`, checked: at least `minimum` examples and, when concrete,
  no NaN/inf in a float input; `what` names the batch in the messages."""
  b = batch_size(batch)
  if b < minimum:
    raise ValueError(
      f"{what} has {b} example(s); at least {minimum} are needed (GradCosine compares the "
      "gradients of different examples; GradInit's look-ahead splits the batch). Use a "
      "larger batch."
    )
  for leaf in jax.tree_util.tree_leaves(batch):
    if isinstance(leaf, jax.core.Tracer):
      continue  # inside a transformation: only shapes can be checked
    x = np.asarray(leaf)  # concrete: checked on the host, also inside an outer trace
    if jnp.issubdtype(x.dtype, jnp.floating) and not bool(np.all(np.isfinite(x))):
      raise ValueError(f"{what} contains NaN or inf values in a float input.")
  return b


def check_chunks(b: int, num_chunks, overlap: float) -> None:
  """`num_chunks` (None or an int in [2, b]) and `overlap` (a float in [0, 1), 0 unless
  `num_chunks` is set) of the batch setting, for a batch of `b` examples."""
  if num_chunks is not None:
    if not isinstance(num_chunks, (int, np.integer)) or isinstance(num_chunks, bool):
      raise TypeError(f"num_chunks must be an int or None, got {type(num_chunks).__name__}.")
    if num_chunks < 2:
      raise ValueError(f"num_chunks={num_chunks}: the batch setting needs at least 2 sub-batches.")
    if num_chunks > b:
      raise ValueError(
        f"num_chunks={num_chunks} is larger than the batch size {b}; use at most {b} "
        "sub-batches (num_chunks=None is the sample-wise setting)."
      )
  if not isinstance(overlap, (float, int)) or isinstance(overlap, bool) or math.isnan(overlap):
    raise TypeError(f"overlap must be a float in [0, 1), got {overlap!r}.")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap={overlap} is outside [0, 1).")
  if num_chunks is None and overlap != 0.0:
    raise ValueError("overlap only applies to the batch setting; set num_chunks as well.")


def check_params(params, what: str = "params") -> None:
  """`params` has array leaves, all floating point (`what` names it in the messages)."""
  if not jax.tree_util.tree_leaves(params):
    raise ValueError(f"{what} has no array leaves.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    _check_floating(
      path,
      leaf,
      f"{what} leaf",
      "parameters must be floating point (integer leaves cannot be scaled or differentiated).",
    )


def _check_floating(path, leaf, subject: str, rule: str) -> None:
  """TypeError `"<subject> <path> has dtype <dt>; <rule>"` unless `leaf` is floating point."""
  dt = jnp.result_type(leaf)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"{subject} {jax.tree_util.keystr(path)} has dtype {dt}; {rule}")


def check_same_structure(a, b, name_a: str, name_b: str) -> None:
  """`b` has the tree structure of `a` (e.g. scales of params); the message lists the paths
  found in only one of them."""
  sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  if sa != sb:
    pa = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)}
    pb = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(b)}
    only_a, only_b = sorted(pa - pb)[:5], sorted(pb - pa)[:5]
    raise ValueError(
      f"{name_b} does not have the tree structure of {name_a}: "
      f"only in {name_a}: {only_a or '-'}; only in {name_b}: {only_b or '-'}. "
      f"Build {name_b} from {name_a} (e.g. nio_jax.init_scales(params))."
    )


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  """`value` is a finite number > 0 (>= 0 with `allow_zero`)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f"{name} must be a number, got {value!r}.")
  if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name}={value} must be finite and {bound}.")


def check_choice(name: str, value, choices) -> None:
  """`value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; known: {', '.join(map(str, choices))}.")


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return text[:limit].rstrip(".")


def check_loss_fn(loss_fn, params, batch) -> None:
  """Checks, without running it, that `loss_fn(params, batch)` traces and returns one
  floating-point loss per example; any failure inside `loss_fn` becomes a `LossFnError`
  naming the cause instead of a traceback from deep inside JAX."""
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  b = batch_size(batch)
  try:
    out = jax.eval_shape(loss_fn, params, batch)
  except Exception as e:  # noqa: BLE001 - re-raised with context
    keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
    shapes = {k: tuple(np.shape(v)) for k, v in batch.items()} if isinstance(batch, dict) else keys
    raise LossFnError(
      f"loss_fn(params, batch) failed on the first batch with {type(e).__name__}: "
      f"{_first_line(e)}. Check that params belong to the "
      f"model loss_fn applies and that the batch has the keys/shapes it expects "
      f"(batch: {shapes})."
    ) from e
  shape = getattr(out, "shape", None)
  if shape != (b,):
    raise ValueError(
      f"loss_fn must return per-example losses of shape [B] = ({b},), got shape {shape}. "
      "Do not average over the batch: return e.g. optax.softmax_cross_entropy_with_integer_"
      "labels(logits, labels) without .mean()."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"loss_fn must return floating-point losses, got {out.dtype}.")


def check_predicate(name: str, value, allow=()) -> None:
  """`value` is None, callable, or one of `allow` (e.g. the string "default")."""
  if value is None or callable(value) or (isinstance(value, str) and value in allow):
    return
  extra = "".join(f", {a!r}" for a in allow)
  raise TypeError(f"{name} must be None{extra} or a predicate (path, leaf) -> bool, got {value!r}.")


def check_optional_int(name: str, value, minimum: int = 1) -> None:
  """`value` is None or an int >= `minimum`."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int or None, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum} (or None).")


def check_iterable(name: str, value) -> None:
  """`value` is an iterable of batches (not None, not a number)."""
  try:
    iter(value)
  except TypeError:
    raise TypeError(
      f"`{name}` must be an iterable of batches (a list, a generator, a data "
      f"loader), got {type(value).__name__}."
    ) from None


def check_grad_stack(grads) -> int:
  """`grads` is a pytree of arrays sharing a leading axis D ≥ 2 (one row per gradient);
  returns D. Shapes only, so it runs inside transformations too."""
  if not jax.tree_util.tree_leaves(grads):
    raise ValueError("grads has no array leaves; expected a pytree of [D, ...] gradient stacks.")
  sizes = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
        f"grads leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs the leading "
        "axis D (one row per per-example / sub-batch gradient)."
      )
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"grads leaves disagree on the number of gradients D: {sorted(sizes)}.")
  d = sizes.pop()
  if d < 2:
    raise ValueError(f"grads holds {d} gradient(s); GradCosine compares at least 2.")
  return d


def check_scales(scales) -> None:
  """Scales are floating point and, when concrete, finite."""
  for path, s in jax.tree_util.tree_leaves_with_path(scales):
    _check_floating(
      path,
      s,
      "scale",
      "scales must be floating point (build them with nio_jax.init_scales(params)).",
    )
    if not isinstance(s, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(s)))):
      raise ValueError(
        f"scale {jax.tree_util.keystr(path)} is NaN or inf; scales must be "
        "finite (use the last good result of a failed search)."
      )
