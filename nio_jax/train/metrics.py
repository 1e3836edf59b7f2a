"""JSON-lines metrics log and training-curve plots."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterable

from nio_jax import cosine
from nio_jax.files import to_jsonable


class MetricsLog:
  """Appends one JSON object per line to `path` (flushed per line)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def reset(self) -> None:
    """Empties the log (a run that starts from scratch)."""
    self.path.write_text("")

  def truncate_after(self, step: int) -> None:
    """Drop records with `step > step` (written after the checkpoint we resume from)."""
    if not self.path.exists():
      return
    keep = [r for r in self.read() if r.get("step", -1) <= step]
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    """Appends `record` as one JSON line."""
    with open(self.path, "a") as f:
      f.write(json.dumps(to_jsonable(record)) + "\n")

  def read(self) -> list[dict]:
    """The records written so far (`read_metrics`)."""
    return read_metrics(self.path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a JSON-lines log (empty when missing; a line cut by a kill is skipped)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut by a kill: ignore
        continue
  return out


def logged_recipe(path: str | os.PathLike) -> dict | None:
  """The optimiser recipe that ran, from the `config` record the trainer writes first in
  `metrics.jsonl` (kept across resumes); None when the log has none.

  Returns:
    `{"name": "no_norm" | "norm", "no_norm_recipe", "lr", "schedule", "momentum",
    "weight_decay", "weight_decay_on_norm_leaves": False, "slow_lr_factor", "grad_clip_norm"}`:
    `slow_lr_factor` is the learning-rate factor of biases and scalar leaves (None when
    they train at the full rate, as in the recipe with normalisation layers) and
    `grad_clip_norm` the global-norm clip (None: no clipping).
  """
  rec = next((r for r in read_metrics(path) if r.get("type") == "config"), None)
  if rec is None:
    return None
  c = rec.get("config") or {}
  no_norm = bool(rec.get("no_norm_recipe"))
  lr = c.get("lr")
  if lr is None and c.get("base_lr") is not None:
    lr = float(c["base_lr"]) * int(c["batch_size"]) / int(c["lr_reference_batch"])
  return {
    "name": "no_norm" if no_norm else "norm",
    "no_norm_recipe": no_norm,
    "lr": lr,
    "schedule": c.get("schedule"),
    "momentum": c.get("momentum"),
    "weight_decay": c.get("weight_decay"),
    "weight_decay_on_norm_leaves": False,
    "slow_lr_factor": c.get("slow_lr_factor") if no_norm else None,
    "grad_clip_norm": rec.get("grad_clip_norm"),
  }


def gc_records(records: Iterable[dict]) -> dict[int, dict]:
  """`{step: measurement}` of the `gc` records (`train.gc_every`) of a metrics log, sorted
  by step; each measurement has `gc` and `grad_norm` (or `error`) and `seconds`."""
  out = {}
  for r in records:
    if r.get("type") == "gc":
      out[int(r["step"])] = {k: v for k, v in r.items() if k not in ("type", "step")}
  return dict(sorted(out.items()))


def plot_curves(records: Iterable[dict], path: str | os.PathLike, title: str = "") -> pathlib.Path:
  """Training loss, train/test accuracy and learning rate against epoch, as one PNG."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # noqa: PLC0415

  records = list(records)
  tr = [r for r in records if r.get("type") == "train"]
  ev = [r for r in records if r.get("type") == "eval"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  ax = axes[0]
  if tr:
    ax.plot([r["epoch"] for r in tr], [r["loss"] for r in tr], lw=1, label="train (window)")
  if ev:
    ax.plot([r["epoch"] for r in ev], [r["train_loss"] for r in ev], "o-", label="train (epoch)")
    ax.plot([r["epoch"] for r in ev], [r["test_loss"] for r in ev], "s-", label="test")
  ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_title("loss"), ax.legend(fontsize=8)
  ax = axes[1]
  if ev:
    ax.plot([r["epoch"] for r in ev], [100 * r["train_acc"] for r in ev], "o-", label="train")
    ax.plot([r["epoch"] for r in ev], [100 * r["test_acc"] for r in ev], "s-", label="test")
  ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.set_title("accuracy")
  ax.legend(fontsize=8)
  ax = axes[2]
  if tr:
    ax.plot([r["epoch"] for r in tr], [r["lr"] for r in tr], lw=1)
  ax.set_xlabel("epoch"), ax.set_ylabel("learning rate"), ax.set_title("learning rate")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def measure_gc(loss_fn: Callable, params, batches: list, **measure_kwargs) -> dict:
  """`nio_jax.cosine.measure` of `params` on the fixed `batches` (all of them), or
  `{"error": ...}` when the measurement fails (e.g. a zero gradient): a GC report never
  crashes a run. `measure_kwargs`: `num_chunks`, `overlap`, `show_progress`, ..."""
  try:
    return cosine.measure(loss_fn, params, batches, num_batches=len(batches), **measure_kwargs)
  except (ValueError, ArithmeticError) as e:
    return {"error": str(e)}


def gc_fn_of(loss_fn: Callable, batches: Iterable, **measure_kwargs) -> Callable[[dict], dict]:
  """`gc_fn(variables) -> measure_gc(loss_fn, variables["params"], batches)` for
  `config.gc_every`: the batches are drawn once here, so every step is measured on the same
  ones and one compiled measurement serves the whole run."""
  batches = list(batches)
  return lambda variables: measure_gc(loss_fn, variables["params"], batches, **measure_kwargs)
