"""Orbax checkpoints of the full training state.

Each checkpoint is one step directory with two items: `state` (params, batch_stats,
opt_state, rng, step: a pytree, via `StandardSave`) and `meta` (JSON: epoch, position of
the data loader, Acc_1 / Acc_best so far, eval history).

Atomicity: orbax writes a step into a temporary directory
(`<step>.orbax-checkpoint-tmp-*`) and renames it into place only once every item is
complete (the rename is the commit). `latest_step()` lists finalised steps only, so a kill
in the middle of a write leaves the previous checkpoint as the latest; leftover temporary
directories are removed when the next manager opens (`cleanup_tmp_directories`).
`max_to_keep >= 2` is enforced so the last good checkpoint is never the one being replaced.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` (`state` + `meta` items)."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
    if max_to_keep < 2:
      raise ValueError("max_to_keep must be >= 2")
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint (a save in flight included), None when none.

    `nio_jax.files.checkpoint_steps` lists the finished ones from outside a run.
    """
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Starts saving `state` and `meta` as checkpoint `step` (asynchronously by default).

    One save is in flight at a time: the previous one is waited for first.
    """
    self.manager.wait_until_finished()
    self.manager.save(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore(self, step: int | None, target: PyTree) -> tuple[PyTree, dict]:
    """Restore `step` (default: latest) into the structure / dtypes / shardings of
    `target`.

    A checkpoint whose params are in the other block layout than `target`'s (a run resumed
    with another `scan` setting) is read in its own layout and converted
    (`match_state_layout`: params, `batch_stats` and the optimizer state). The
    checkpoint itself is only read, never rewritten.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    layouts = self._layouts(int(step), target)
    if layouts is not None:
      return self._restore_other_layout(int(step), target, *layouts)
    out = self.manager.restore(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return out["state"], dict(out["meta"])

  def _layouts(self, step: int, target: PyTree) -> tuple[str, str] | None:
    """`(saved, wanted)` block layouts when the checkpoint's params are in the other layout
    than `target`'s, else None (same layout, no block stacks, or unreadable metadata)."""
    from nio_jax.models import block_layout  # noqa: PLC0415

    want = block_layout(target.get("params") if isinstance(target, dict) else None)
    if want is None:
      return None
    handler = ocp.StandardCheckpointHandler()
    try:
      # the saved tree's metadata: its keys, without reading any array
      saved = block_layout(handler.metadata(self.directory / str(step) / "state")["params"])
    except Exception:  # noqa: BLE001 - unreadable: the plain restore (and orbax's error) stands
      return None
    finally:
      handler.close()
    return (saved, want) if saved and saved != want else None

  def _restore_other_layout(
    self, step: int, target: PyTree, saved: str, want: str
  ) -> tuple[PyTree, dict]:
    """Restore `step` in its own (saved) layout, without a target, and convert it to
    `target`'s layout."""
    out = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    try:
      state = match_state_layout(out["state"], target)
    except ValueError as e:
      raise ValueError(
        f"checkpoint {step} in {self.directory} holds params in the {saved} block layout, "
        f"and this model is {want}; the saved state does not convert to this model's: {e}. "
        "Resume with the model and config the run was started with. The checkpoint is left "
        "as it is."
      ) from e
    return state, dict(out["meta"])

  def wait(self) -> None:
    """Waits until the save in flight, if any, is written."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight and closes the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def match_state_layout(state: PyTree, target: PyTree) -> PyTree:
  """A training state (`params`, `batch_stats`, `opt_state`, ...) in one block layout,
  converted to the block layout, structure, dtypes and shardings of `target`.

  Every subtree of `state` shaped like its params (the params themselves and each
  params-shaped tree of the optimizer state, e.g. a momentum `trace`, with `MaskedNode`s
  where a parameter group leaves a leaf out) is converted with `models.match_layout`; other
  mappings whose keys differ (`batch_stats`) with `match_layout` directly; every other leaf
  (`step`, the optimizer's `count`, `rng`) is kept. `state` may be orbax's restore
  without a target: dicts for optax's NamedTuples, lists for tuples, None for empty states
  and `MaskedNode`s.

  Args:
    state: the state in the saved layout; `state["params"]` gives that layout.
    target: the same state's structure in the wanted layout (e.g. freshly initialised:
      `opt_state = tx.init(params)`); only its structure, dtypes and shardings are used.

  Returns:
    `state`'s values in `target`'s structure; the block conversion is exact (slicing
    and stacking only).

  Raises:
    ValueError: `state` does not convert to `target`'s structure (another model, or an
      optimizer whose parameter groups differ).
  """
  from nio_jax.models import match_layout  # noqa: PLC0415

  src, dst = state["params"], target["params"]
  src_def = jax.tree_util.tree_structure(src)
  dst_def = jax.tree_util.tree_structure(dst)

  def params_like(s, t, where):
    leaves, s_def = jax.tree_util.tree_flatten(s, is_leaf=_is_empty)
    if s_def != src_def:
      raise ValueError(f"{where} is not shaped like the saved params")
    # Leaves a parameter group leaves out (None / MaskedNode) are filled with zeros for the
    # conversion and dropped again; `present` records which leaves held values.
    ps = jax.tree_util.tree_leaves(src)
    full = [np.zeros(p.shape, p.dtype) if _is_empty(x) else x for x, p in zip(leaves, ps)]
    present = [np.full(p.shape, not _is_empty(x)) for x, p in zip(leaves, ps)]
    full, present = (
      jax.tree_util.tree_leaves(match_layout(jax.tree_util.tree_unflatten(src_def, v), dst))
      for v in (full, present)
    )
    t_leaves, t_def = jax.tree_util.tree_flatten(t, is_leaf=_is_masked)
    out = []
    for t_leaf, value, has in zip(t_leaves, full, present):
      masked = _is_masked(t_leaf)
      if not np.all(np.asarray(has) != masked):
        raise ValueError(f"{where}: the optimizer's parameter groups differ between the layouts")
      out.append(t_leaf if masked else value)
    return jax.tree_util.tree_unflatten(t_def, out)

  def walk(s, t, where):
    if isinstance(t, Mapping):
      if jax.tree_util.tree_structure(t, is_leaf=_is_masked) == dst_def:
        return params_like(s, t, where)
      if not isinstance(s, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(s).__name__}")
      if set(s) != set(t):
        out = match_layout(s, t)  # e.g. batch_stats
      else:
        out = {k: walk(s[k], t[k], f"{where}/{k}") for k in t}
      return out if type(t) is dict else type(t)(out)
    if isinstance(t, (tuple, list)):
      if s is None and not t:  # an empty optax state or MaskedNode, restored as None
        return t
      fields = getattr(t, "_fields", None)
      if isinstance(s, Mapping) and fields is not None:  # a NamedTuple restored as a dict
        if set(s) != set(fields):
          raise ValueError(f"{where}: entries {sorted(s)}, expected {list(fields)}")
        s = [s[f] for f in fields]
      if not isinstance(s, (tuple, list)) or len(s) != len(t):
        raise ValueError(f"{where}: expected {len(t)} entries, got {type(s).__name__}")
      vals = [walk(a, b, f"{where}/{i}") for i, (a, b) in enumerate(zip(s, t))]
      return type(t)(*vals) if fields is not None else type(t)(vals)
    if t is None:
      return None
    if s is None or isinstance(s, (Mapping, tuple, list)):
      raise ValueError(f"{where}: expected an array, got {type(s).__name__}")
    return s

  out = walk(state, target, "state")
  if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(target):
    raise ValueError("the converted state does not have the structure of the model's state")
  flat, _ = jax.tree_util.tree_flatten_with_path(out)
  for (path, x), t in zip(flat, jax.tree_util.tree_leaves(target)):
    if _shape(x) != _shape(t):
      raise ValueError(
        f"{jax.tree_util.keystr(path)} has shape {_shape(x)} saved, {_shape(t)} in the model"
      )
  return jax.tree.map(_like, out, target)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_empty(x) -> bool:
  return x is None or _is_masked(x)


def _shape(x) -> tuple:
  return tuple(getattr(x, "shape", np.shape(x)))


def _like(x, t):
  """`x` with the dtype and sharding of `t` (when `t` is an array)."""
  if isinstance(t, jax.Array):
    return jax.device_put(jnp.asarray(x, t.dtype), t.sharding)
  if isinstance(t, np.ndarray):
    return np.asarray(x, t.dtype)
  return x
