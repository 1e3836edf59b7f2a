"""Orbax checkpoints of the full training state.

Each checkpoint is one step directory with two items: ``state`` (params, batch_stats,
opt_state, rng, step: a pytree, via ``StandardSave``) and ``meta`` (JSON: epoch, position of
the data loader, Acc_1 / Acc_best so far, eval history).

Atomicity: orbax writes a step into a temporary directory
(``<step>.orbax-checkpoint-tmp-*``) and renames it into place only once every item is
complete (the rename is the commit). ``latest_step()`` lists finalised steps only, so a kill
in the middle of a write leaves the previous checkpoint as the latest; leftover temporary
directories are removed when the next manager opens (``cleanup_tmp_directories``).
``max_to_keep >= 2`` is enforced so the last good checkpoint is never the one being replaced.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` (``state`` + ``meta`` items)."""

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
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    # One save in flight at a time: wait for the previous one before starting the next.
    self.manager.wait_until_finished()
    self.manager.save(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore(self, step: int | None, target: PyTree) -> tuple[PyTree, dict]:
    """Restore ``step`` (default: latest) into the structure / dtypes / shardings of
    ``target``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      out = self.manager.restore(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:
      self._raise_if_other_layout(int(step), target, e)
      raise
    return out["state"], dict(out["meta"])

  def _raise_if_other_layout(self, step: int, target: PyTree, error: Exception) -> None:
    """A clear error, instead of orbax's, when the checkpoint's params are in the other block
    layout than ``target``'s (a run resumed with another ``scan`` setting). Resuming would
    need the optimizer state converted too; the checkpoint is left untouched."""
    from nio_jax.models import block_layout  # noqa: PLC0415

    want = block_layout(target.get("params") if isinstance(target, dict) else None)
    try:
      # the saved tree's metadata: its keys, without reading any array
      meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
      saved = block_layout(meta.item_metadata["params"])
    except Exception:  # noqa: BLE001 - unreadable: orbax's own error stands
      return
    if want and saved and want != saved:
      raise ValueError(
        f"checkpoint {step} in {self.directory} holds params in the {saved} block layout, "
        f"and this model is {want} (its `scan` setting differs). Resume with the setting the "
        "run was started with; or start a new run from the checkpoint's params, which load "
        "into either layout (`nio_jax.experiment.load_checkpoint_variables`, "
        "`nio-jax measure RUN_DIR --checkpoint STEP`). The checkpoint is left as it is."
      ) from error

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_msgpack_variables(path: str | os.PathLike, target: PyTree) -> PyTree:
  """Flax msgpack variables (`flax.serialization.to_bytes`) restored into the structure of
  `target`, converted to `target`'s block layout first (`models.match_layout`: params saved
  from a scanned model load into an unrolled one and back). Shapes are not checked here."""
  from flax import serialization  # noqa: PLC0415

  from nio_jax.models import match_layout  # noqa: PLC0415

  state = serialization.msgpack_restore(pathlib.Path(path).read_bytes())
  state = match_layout(state, serialization.to_state_dict(target))
  return serialization.from_state_dict(target, state)
