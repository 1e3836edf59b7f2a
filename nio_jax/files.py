"""The files of a run directory: JSON, msgpack variables and the trainer's checkpoints.

One module for the small reads and writes that the experiment, the trainer, the CLI, the
reports and `benchmarks/sweep.py` share:

* `to_jsonable`, `write_json` (atomic), `read_json` (a default when missing), and the
  name of a run's record, `RUN_RECORD`; in a multi-process run only process 0 writes records
  and variables, and every process waits until they are written (`written_by_primary`);
* `save_variables` / `load_variables`: Flax msgpack variables (never pickle), loaded in
  either block layout (`models.match_layout`) with their shapes checked;
* `holds_run` / `clear_run`: whether a directory holds a run's results, and deleting them
  (only the files a run writes; `nio-jax ... --overwrite`);
* `checkpoint_steps` (the one listing of the trainer's checkpoint steps) and
  `load_checkpoint_variables` (the params / batch statistics of one of them).

A file that does not fit the model of the config raises `ConfigError` (the CLI prints it).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from nio_jax.errors import ConfigError
from nio_jax.models import match_layout

PyTree = Any

# The record of one `nio_jax.experiment.train_run` in its run directory: accuracies, the GC
# report, wall times (read by `nio_jax.reports` and `benchmarks/sweep.py`).
RUN_RECORD = "run_record.json"


# What a run writes into its directory that holds results (a rerun of another config must
# not mix with them; `holds_run`).
RESULT_FILES = (
  "checkpoints",
  "init_params.msgpack",
  "final_params.msgpack",
  "init_history.json",
  "init_report.json",
  "scales.json",
  RUN_RECORD,
  "metrics.jsonl",
  "compare.json",
)
# Every other file a run writes there (deleted with the results by `clear_run`).
OTHER_RUN_FILES = (
  "config.json",
  "run.json",
  "report.md",
  "curves.png",
  "compare.md",
  "compare.png",
  "report_training.png",
  "report_search.png",
)


def _barrier(name: str) -> None:
  """With several processes, waits until every process reaches `name` (a collective)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(f"nio_jax {name}")


def holds_run(workdir: str | os.PathLike) -> bool:
  """True when `workdir` holds a run's results (any of `RESULT_FILES`). In a multi-process run
  every process answers before any may go on (a barrier), so all of them decide on the same
  files even when process 0 clears them next."""
  workdir = pathlib.Path(workdir)
  found = any((workdir / name).exists() for name in RESULT_FILES)
  _barrier(f"holds_run {workdir}")
  return found


def clear_run(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """`_clear_run` on process 0 only, then a barrier (multi-process runs); returns the paths
  deleted (by process 0; the same list is computed, not deleted, by the others)."""
  workdir = pathlib.Path(workdir)
  if is_primary():
    removed = _clear_run(workdir)
  else:
    removed = []
  _barrier(f"clear_run {workdir}")
  return removed


def _clear_run(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """Deletes the files a run wrote into `workdir` (`RESULT_FILES`, `OTHER_RUN_FILES`, the
  `report_scales*.png` plots) and, for a `nio-jax compare` directory, its methods' run
  folders (those named in its `compare.json`); anything else in `workdir` stays.

  Returns:
    The paths deleted.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    return []
  methods = (read_json(workdir / "compare.json") or {}).get("methods") or []
  removed: list[pathlib.Path] = []
  for m in methods:
    sub = workdir / str(m)
    if str(m) and "/" not in str(m) and sub.is_dir():
      removed += _clear_run(sub)
      if not any(sub.iterdir()):
        sub.rmdir()
        removed.append(sub)
  names = [*RESULT_FILES, *OTHER_RUN_FILES]
  for p in [workdir / n for n in names] + sorted(workdir.glob("report_scales*.png")):
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
      p.unlink()
    else:
      continue
    removed.append(p)
  return removed


def to_jsonable(x: Any) -> Any:
  """numpy / jax scalars and arrays, dicts, lists and tuples as plain JSON values.

  Non-finite floats become None; any other object becomes its `repr`.
  """
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
    a = np.asarray(x)
    if a.ndim == 0:
      return to_jsonable(a.item())
    return to_jsonable(a.tolist())
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, (int, str, bool)) or x is None:
    return x
  return repr(x)


def is_primary() -> bool:
  """Whether this process writes a run's records and reports: always with one process, only
  process 0 in a multi-process run (`jax.distributed`)."""
  return jax.process_count() == 1 or jax.process_index() == 0


def written_by_primary(path: pathlib.Path, write) -> pathlib.Path:
  """Runs `write()` on the primary process only; with several processes all of them then wait
  at a barrier named after `path`, so that the file exists for every process when this
  returns (the workdir must be shared, as Orbax's multi-host checkpoints require). Every
  process must call it, in the same order (a collective)."""
  if is_primary():
    write()
  _barrier(f"write {path}")
  return path


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented JSON (`to_jsonable` first), atomically; returns the path.
  In a multi-process run only process 0 writes (`written_by_primary`)."""
  path = pathlib.Path(path)
  text = json.dumps(to_jsonable(obj), indent=1)

  def write():
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

  return written_by_primary(path, write)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
  """The JSON in `path`, or `default` when the file is missing or unreadable."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return default


def save_variables(path: str | os.PathLike, variables: PyTree) -> pathlib.Path:
  """Writes a variables dict with Flax msgpack serialization (no pickle), atomically."""
  from flax import serialization  # noqa: PLC0415

  path = pathlib.Path(path)
  data = serialization.to_bytes(jax.device_get(variables))

  def write():
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

  return written_by_primary(path, write)


def load_variables(path: str | os.PathLike, target: PyTree) -> PyTree:
  """Msgpack variables restored into the structure of `target`.

  Variables saved from the other block layout (scanned or unrolled) are converted to
  `target`'s first (`models.match_layout`); every leaf's shape must then match `target`'s.

  Raises:
    ConfigError: the file does not hold variables of `target`'s model.
  """
  from flax import serialization  # noqa: PLC0415

  try:
    state = serialization.msgpack_restore(pathlib.Path(path).read_bytes())
    state = match_layout(state, serialization.to_state_dict(target))
    restored = serialization.from_state_dict(target, state)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None
  for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(restored)):
    if getattr(a, "shape", None) != getattr(b, "shape", None):
      raise ConfigError(
        f"{path}: saved params do not match the model of this config "
        f"(shape {getattr(b, 'shape', None)} vs {getattr(a, 'shape', None)})"
      )
  return restored


def checkpoint_steps(ckpt_dir: str | os.PathLike) -> list[int]:
  """The steps of the trainer's finished checkpoints in `ckpt_dir`, sorted (empty if none).

  A write cut by a kill lives in a temporary directory until orbax renames it into place,
  so it is not listed.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  if not ckpt_dir.is_dir():
    return []
  return sorted(
    int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and (p / "state").is_dir()
  )


def load_checkpoint_variables(ckpt_dir: str | os.PathLike, step: str, target: PyTree) -> PyTree:
  """`{"params", ["batch_stats"]}` of the trainer checkpoint `step` (a step or "latest").

  A checkpoint in the other block layout than `target`'s is converted.

  Raises:
    ConfigError: no such checkpoint, or it does not match `target`'s model.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  steps = checkpoint_steps(ckpt_dir)
  if not steps:
    raise ConfigError(f"no checkpoints in {ckpt_dir}")
  s = steps[-1] if step == "latest" else int(step) if str(step).isdigit() else None
  if s not in steps:
    raise ConfigError(f"checkpoint {step!r} not found in {ckpt_dir}; steps: {steps}")
  state = ocp.StandardCheckpointer().restore(ckpt_dir / str(s) / "state")
  v = {k: state[k] for k in ("params", "batch_stats") if k in state}
  want = {k: target[k] for k in v if k in target}
  try:  # saved in the other block layout (scan vs unrolled): convert
    v = match_layout(v, want)
  except ValueError:
    pass
  if jax.tree.structure(want) != jax.tree.structure(v):
    raise ConfigError(f"checkpoint {s} in {ckpt_dir} does not match the model of this config")
  return v
