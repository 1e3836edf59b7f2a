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
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and not _all_finite(leaf):
      raise ValueError(f"{what} contains NaN or inf values in a float input.")
  return b


@jax.jit
def _all_finite_global(x):
  return jnp.all(jnp.isfinite(x))


def _all_finite(x) -> bool:
  """Whether a concrete array has no NaN/inf. Read on the host, also inside an outer trace;
  an array spanning other processes' devices (a multi-process global batch) is reduced on
  its devices instead, so every process gets the same answer (all of them must call this on
  the same arrays: it is a collective)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    ok = _all_finite_global(x)
    return True if isinstance(ok, jax.core.Tracer) else bool(ok)  # staged: cannot check
  return bool(np.all(np.isfinite(np.asarray(x))))


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


def check_not_callable(params, what: str = "params") -> None:
  """`params` is a pytree of arrays, not a function or a model: the public entry points take
  `(loss_fn, params, ...)`, and swapped arguments would otherwise fail deep inside JAX
  ("Cannot determine dtype of <function ...>")."""
  if callable(params) and not hasattr(params, "shape"):
    swapped = (
      " The argument order is (loss_fn, params, ...), e.g. nio_jax.nio(loss_fn, params, "
      "batches): were loss_fn and params swapped?"
      if what == "params"
      else ""
    )
    raise TypeError(
      f"{what} must be a pytree of arrays (e.g. variables['params']), got the callable "
      f"{getattr(params, '__qualname__', type(params).__name__)}.{swapped}"
    )


def check_params(params, what: str = "params") -> None:
  """`params` has array leaves, all floating point (`what` names it in the messages)."""
  check_not_callable(params, what)
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


def _inner_message(e: BaseException) -> str:
  """The whole message of `e` (without JAX's note on its removed internal frames)."""
  text = str(e).strip()
  cut = text.find("\n--------------------")
  return (text[:cut] if cut > 0 else text).strip()


def _cause_hint(e: BaseException, batch) -> str:
  """The likely cause of a `loss_fn` failure and its fix, recognised from the exception
  (the empty string when it is not one of the known cases)."""
  text, name = str(e), type(e).__name__
  if name == "InvalidRngError" or "needs PRNG for" in text:
    stream = text.split('needs PRNG for "')[1].split('"')[0] if 'needs PRNG for "' in text else ""
    return (
      f"Likely cause: the model needs a random key for the {stream or 'an'!r} rng stream "
      "(dropout or another stochastic layer) and loss_fn passes none. Fix: build the loss "
      "with nio_jax.flax_utils.linen_loss_fn(model, ...), which passes a fresh key per batch "
      "(dropout=False turns dropout off), or pass rngs={...} to model.apply yourself."
    )
  if name == "TraceContextError" or "from a different trace level" in text:
    return (
      "Likely cause: an NNX model's state (BatchNorm statistics, an Rngs counter of "
      "Dropout) is mutated inside the traced loss while the model object lives outside it. "
      "Fix: use nio_jax.flax_utils.nnx_loss_fn(model), which merges a fresh copy of the "
      "model on every call."
    )
  if "unbound axis name" in text:
    axis = text.split("unbound axis name:")[-1].strip().split()[0].strip("'\".,")
    return (
      f"Likely cause: the model uses a collective over the axis {axis!r} (e.g. "
      f"nn.BatchNorm(axis_name={axis!r}), written for pmap) and nothing binds it. Fix: "
      f"nio_jax.flax_utils.linen_loss_fn(model, ..., axis_name={axis!r}), which applies the "
      "model under a one-element vmap that binds it (the mean is then over the batch)."
    )
  if "unexpected keyword argument" in text:
    kw = text.split("unexpected keyword argument ")[-1].strip().strip("'\"")
    return (
      f"Likely cause: the model's __call__ has no {kw!r} argument (its training flag is "
      "named otherwise). Fix: name it with nio_jax.flax_utils.linen_loss_fn(model, "
      "train_flag='training') (or 'is_training', or 'deterministic', which is inverted; "
      "train_flag=None passes no flag)."
    )
  if "indices must be integers" in text and isinstance(batch, (tuple, list)):
    return (
      "Likely cause: the batch is a tuple/list but loss_fn reads it by key. Fix: tell the "
      "adapter where inputs and labels are, e.g. nio_jax.flax_utils.linen_loss_fn(model, "
      "inputs=0, labels=1) (a key, an index or a function batch -> value), or index the "
      "tuple in your loss_fn."
    )
  shape_words = ("shape", "dimension", "incompatible", "broadcast", "dot_general")
  if name in ("TypeError", "ValueError", "ScopeParamShapeError") and any(
    w in text for w in shape_words
  ):
    return (
      "Likely cause: a shape mismatch: the batch's inputs do not have the shape the params "
      "were initialised for (or the params belong to another model). Fix: give the batch the "
      "input shape used at model.init (batch axis first), or initialise the model on it."
    )
  return ""


def check_loss_fn(loss_fn, params, batch) -> None:
  """Checks, without running it, that `loss_fn(params, batch)` traces and returns one
  floating-point loss per example; any failure inside `loss_fn` becomes a `LossFnError`
  that keeps the inner message whole, names the likely cause when it is a known one (a
  missing rng stream, an NNX trace-level mutation, an unexpected training keyword, a tuple
  batch read by key, a shape mismatch) and its fix, and chains the original exception
  (`__cause__`)."""
  if not callable(loss_fn):
    swapped = (
      " The argument order is (loss_fn, params, ...): were loss_fn and params swapped?"
      if callable(params)
      else ""
    )
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.{swapped}")
  check_not_callable(params)
  b = batch_size(batch)
  try:
    out = jax.eval_shape(loss_fn, params, batch)
  except Exception as e:  # noqa: BLE001 - re-raised with context
    if isinstance(batch, dict):
      shapes = {k: tuple(np.shape(v)) for k, v in batch.items()}
    else:  # any other pytree: its structure with each leaf's shape
      shapes = jax.tree_util.tree_map(lambda v: tuple(np.shape(v)), batch)
    hint = _cause_hint(e, batch) or (
      "Check that params belong to the model loss_fn applies and that the batch has the "
      "keys/shapes it expects."
    )
    inner = _inner_message(e)
    inner += "" if inner.endswith((".", "!", "?", ")")) else "."
    raise LossFnError(
      f"loss_fn(params, batch) failed on the first batch with {type(e).__name__}: "
      f"{inner}\n{hint} Batch: {shapes}."
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
