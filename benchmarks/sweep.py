"""Sweep: a grid of experiment configs, each run with `nio_jax.experiment.train_run`.

    python -m benchmarks.sweep --grid fmnist --time-one   # time one run of each model
    python -m benchmarks.sweep --grid fmnist              # run / resume the grid
    python -m benchmarks.sweep --grid fmnist --collect    # only rebuild table and plots

A grid (`configs/sweep_<name>.py:get_grid()`) is `{"name", "eval_steps", "cells"}`; a cell is
`{"model", "method", "seeds", "config"}` with a config of `nio_jax.experiment_config.base_config()`.
The runs go one at a time, cell after cell in the grid's order, all seeds of a cell in a row
(the cell's search and train steps compile once: the experiment driver shares the loss
function and the trainer caches its step). Every run lives in
`<root>/<grid>/<model>/<method>/seed<k>`; a run whose `run_record.json` says finished is
skipped, and so is one whose committed per-run JSON says finished (a fresh clone: adding
seeds or cells to a grid runs only the new runs); an unfinished one is started again from
scratch (its times are then honest).

Results in `<results>/sweep_<grid>/`: `runs/<model>__<method>__seed<k>.json` (raw per-run
records, with the optimiser `recipe` that ran and the run's `quiet` verdict: the share of
the machine other processes used meanwhile), `table.md` / `table.json` (mean ± sample std
over seeds), `significant.md` (`benchmarks.sweep_stats`: medians, seeds near chance, every
cell that differs from Kaiming by more than the seed spread, paired sign tests),
`<model>_curves.png` (test accuracy against step, mean ± std bands). `--commit` commits them
after each cell.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import importlib.util
import math
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import sweep_stats
from nio_jax import errors, experiment, files, methods
from nio_jax.bench import machine
from nio_jax.experiment_config import validate_config
from nio_jax.reports import pyplot, save_figure

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_grid(name: str) -> dict:
  """`configs/sweep_<name>.py:get_grid()`, or a path to such a file."""
  path = pathlib.Path(name)
  if not path.exists():
    path = REPO / "configs" / f"sweep_{name}.py"
  if not path.exists():
    raise SystemExit(f"unknown grid {name!r}: no {path}")
  spec = importlib.util.spec_from_file_location(f"sweep_grid_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  grid = mod.get_grid()
  grid.setdefault("name", path.stem.removeprefix("sweep_"))
  return grid


def run_config(cell: dict, seed: int):
  """The validated config of one run: the cell's config with its seed. A method whose config
  has a `seed` field (LSUV's orthonormal draw; MetaInit's Gaussian inputs) gets the run's seed
  unless the cell sets one, so each seed has its own init."""
  cfg = copy.deepcopy(cell["config"])
  cfg.seed = int(seed)
  cls = methods.get_method(cfg.init.method).config_cls
  fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
  if "seed" in fields and "seed" not in cfg.init.config:
    cfg.init.config.seed = int(seed)
  validate_config(cfg)
  return cfg


def run_dir(root: pathlib.Path, grid: dict, cell: dict, seed: int) -> pathlib.Path:
  return pathlib.Path(root) / grid["name"] / cell["model"] / cell["method"] / f"seed{seed}"


def _result_path(results, grid: dict, cell: dict, seed: int) -> pathlib.Path:
  """The committed raw record of one run."""
  name = f"{cell['model']}__{cell['method']}__seed{seed}.json"
  return pathlib.Path(results) / f"sweep_{grid['name']}" / "runs" / name


def committed_record(results, grid: dict, cell: dict, seed: int) -> dict | None:
  """The committed per-run JSON of this run when it is finished and is this cell's run (same
  config name, model, method and seed), else None."""
  if results is None:
    return None
  rec = files.read_json(_result_path(results, grid, cell, seed))
  if not rec or not rec.get("finished"):
    return None
  cfg = cell["config"]
  same = (rec.get("name"), rec.get("model"), rec.get("method"), rec.get("seed")) == (
    cfg.name,
    cfg.model.name,
    cfg.init.method,
    int(seed),
  )
  return rec if same else None


# The quiet verdict of one run from its `CpuWindow` record (`{"other_cpu_share", "verdict",
# "threshold", ...}`, NOISY above 5 %); shared with the other benchmark scripts.
quiet_verdict = machine.verdict

# The command line of this process when it runs as `python -m benchmarks.sweep` (set by
# `main`); each per-run JSON and `table.json` store it beside the environment and commit.
_COMMAND: str | None = None


def command() -> str:
  """The sweep's command line, or a note that it ran from Python (a test, a notebook)."""
  return _COMMAND or "benchmarks.sweep called from Python (no command line)"


def n_diverged(records: list[dict]) -> int:
  """How many of `records` did not finish (their training or their search diverged)."""
  return sum(not r["status"].startswith("finished") for r in records)


def init_diverged_record(cfg, error, seconds: float) -> dict:
  """The record of a run whose initialisation search raised `NonFiniteError` (the library
  stops a search at its first non-finite value): finished, with status "init diverged at
  step N", the error's message, and no training (no accuracies; the table counts it among
  the cell's diverged runs, and every mean is over the other seeds)."""
  return {
    "name": cfg.name,
    "model": cfg.model.name,
    "method": cfg.init.method,
    "seed": int(cfg.seed),
    "status": f"init diverged at step {error.step}",
    "finished": True,
    "error": str(error),
    **experiment.untrained_fields(),  # the same training fields as a run record's
    "before": None,
    "after": None,
    "search_steps": int(error.step),
    "search_seconds": None,
    "init_seconds_until_error": seconds,
    "resumed": False,
  }


def run_one(grid: dict, cell: dict, seed: int, root, results, log=print) -> dict:
  """One run (skipped when finished, started afresh when unfinished); its record.

  A run is finished when its run directory's `run_record.json` says so or, on a machine
  without that directory (a fresh clone), when its committed per-run JSON does (see
  `committed_record`). The record stores the run's wall times and its quiet verdict
  (`quiet`, :func:`quiet_verdict`).
  """
  wd = run_dir(root, grid, cell, seed)
  tag = f"{cell['model']}/{cell['method']}/seed{seed}"
  if experiment.is_finished(wd):
    log(f"[sweep] skip {tag} (finished)")
    return {**files.read_json(wd / files.RUN_RECORD), "skipped": True}
  committed = committed_record(results, grid, cell, seed)
  if committed is not None:
    log(f"[sweep] skip {tag} (finished, committed record)")
    return {**committed, "skipped": True}
  if wd.exists():
    shutil.rmtree(wd)  # an interrupted run: start again, so its wall times are whole
  log(f"[sweep] start {tag}")
  t0 = time.perf_counter()
  cfg = run_config(cell, seed)
  with machine.CpuWindow() as window:
    try:
      rec = experiment.train_run(cfg, wd, progress=False)
    except errors.NonFiniteError as e:  # a diverged search is a result, as a diverged training
      rec = init_diverged_record(cfg, e, time.perf_counter() - t0)
  rec = {**rec, "cell_model": cell["model"], "cell_method": cell["method"]}
  rec["run_seconds"] = time.perf_counter() - t0
  rec["quiet"] = quiet_verdict(window.record())
  rec["command"] = command()
  rec["environment"] = environment()  # with the git commit the run started from
  wd.mkdir(parents=True, exist_ok=True)
  files.write_json(wd / files.RUN_RECORD, rec)
  out = _result_path(results, grid, cell, seed)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.write_json(out, rec)
  log(
    f"[sweep] done {tag}: {rec['status']}, acc {rec['acc_steps']} final "
    f"{rec['final_test_acc']}; search {rec.get('search_seconds') or 0:.1f}s train "
    f"{rec.get('train_seconds') or 0:.1f}s eval {rec.get('eval_seconds') or 0:.1f}s; "
    f"{rec['quiet']['verdict']} (other processes {rec['quiet']['other_cpu_share']})"
  )
  return rec


# --------------------------------------------------------------------------------------------
# Table and plots
# --------------------------------------------------------------------------------------------


def mean_std(vals) -> tuple[float | None, float | None, int]:
  """Mean, sample std (ddof 1; 0 for one value) and count of the non-missing values."""
  vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not vals:
    return None, None, 0
  a = np.asarray(vals, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0), len(a)


def _cell(m, s, n, scale=100.0, digits=1) -> str:
  if m is None:
    return "–"
  return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"


def _records(grid, root, results=None) -> tuple[list[dict], list[str]]:
  """Finished runs' records: from the run directory under `root`, else (a fresh clone, whose
  `runs/` is gone) from the committed per-run JSON under `results`."""
  recs, missing = [], []
  for cell in grid["cells"]:
    for seed in cell["seeds"]:
      r = files.read_json(run_dir(root, grid, cell, seed) / files.RUN_RECORD)
      if (r is None or not r.get("finished")) and results is not None:
        r = files.read_json(_result_path(results, grid, cell, seed))
      if r is None or not r.get("finished"):
        missing.append(f"{cell['model']}/{cell['method']}/seed{seed}")
      else:
        recs.append({**r, "cell_model": cell["model"], "cell_method": cell["method"]})
  return recs, missing


def table(grid: dict, records: list[dict]) -> dict:
  """Per model and method: mean ± std over seeds of every reported quantity."""
  out: dict = {}
  for cell in grid["cells"]:
    rs = [
      r for r in records if r["cell_model"] == cell["model"] and r["cell_method"] == cell["method"]
    ]
    if not rs:
      continue
    row = {"seeds": sorted(r["seed"] for r in rs)}
    row["diverged"] = n_diverged(rs)
    for k in grid["eval_steps"]:
      row[f"acc@{k}"] = mean_std([r["acc_steps"].get(str(k)) for r in rs])
    row["acc_end"] = mean_std([r["final_test_acc"] for r in rs])
    n_ep = max(len(r["acc_epochs"]) for r in rs)
    for e in range(n_ep):
      row[f"acc_{e + 1}"] = mean_std([(r["acc_epochs"] + [None] * n_ep)[e] for r in rs])
    for when in ("before", "after"):
      for q in ("gc", "grad_norm"):
        row[f"{q}_{when}"] = mean_std([(r.get(when) or {}).get(q) for r in rs])
    # The first seed of a cell pays the compilations; the others show the steady cost.
    warm = [r for r in rs if r["seed"] != min(row["seeds"])] or rs
    for key in ("search_seconds", "train_seconds", "eval_seconds", "step_seconds"):
      row[key] = mean_std([r.get(key) for r in warm])
    row["search_rel_step"] = mean_std([r.get("search_rel_step") for r in warm])
    out.setdefault(cell["model"], {})[cell["method"]] = row
  return out


def markdown(grid: dict, tab: dict, missing: list[str]) -> str:
  ks = grid["eval_steps"]
  lines = [
    f"# Sweep `{grid['name']}`",
    "",
    "Test accuracy (%) mean ± sample std over seeds; Acc@k on the fixed test subset, end "
    "(and Acc_e at epoch ends) on the whole test set. GC / gradient norm before → after "
    "the init (`nio_jax.measure`, the configs' measure setting). Search ×step: search wall "
    "time over one training step; times from the seeds after a cell's first (compiled).",
    "",
  ]
  if missing:
    lines += [f"Not run yet: {', '.join(missing)}.", ""]
  for model, rows in tab.items():
    n_ep = max(sum(k.startswith("acc_") and k[4:].isdigit() for k in r) for r in rows.values())
    ep = [f"acc_{e + 1}" for e in range(n_ep)] if n_ep > 1 else []
    head = (
      ["method", "seeds"]
      + [f"Acc@{k}" for k in ks]
      + ["end"]
      + [f"Acc_{e[4:]}" for e in ep]
      + ["GC before → after", "grad norm before → after", "search ×step", "search s", "step s"]
    )
    lines += [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in rows.items():
      gc = (
        f"{r['gc_before'][0]:.3f} → {r['gc_after'][0]:.3f}"
        if r["gc_before"][0] is not None and r["gc_after"][0] is not None
        else "–"
      )
      gn = (
        f"{r['grad_norm_before'][0]:.3g} → {r['grad_norm_after'][0]:.3g}"
        if r["grad_norm_before"][0] is not None and r["grad_norm_after"][0] is not None
        else "–"
      )
      seeds = str(len(r["seeds"])) + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
      cells = (
        [method, seeds]
        + [_cell(*r[f"acc@{k}"]) for k in ks]
        + [_cell(*r["acc_end"])]
        + [_cell(*r[e]) for e in ep]
        + [
          gc,
          gn,
          _cell(*r["search_rel_step"], scale=1.0, digits=0),
          _cell(*r["search_seconds"], scale=1.0, digits=1),
          _cell(*r["step_seconds"], scale=1.0, digits=3),
        ]
      )
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot_curves(grid: dict, records: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """One PNG per model: test accuracy against step per method, mean ± std bands."""
  plt = pyplot()
  paths = []
  method_names = list(dict.fromkeys(c["method"] for c in grid["cells"]))
  colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(method_names)}
  for model in dict.fromkeys(c["model"] for c in grid["cells"]):
    rs = [r for r in records if r["cell_model"] == model]
    if not rs:
      continue
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in method_names:
      mr = [r for r in rs if r["cell_method"] == method]
      if not mr:
        continue
      pts: dict[int, list[float]] = {}
      for r in mr:
        for k, v in r["acc_steps"].items():
          pts.setdefault(int(k), []).append(v)
        for e, v in enumerate(r["acc_epochs"]):
          pts.setdefault((e + 1) * int(r["steps_per_epoch"]), []).append(v)
      xs = sorted(pts)
      mu = np.array([np.mean(pts[x]) for x in xs]) * 100
      sd = np.array([np.std(pts[x], ddof=1) if len(pts[x]) > 1 else 0.0 for x in xs]) * 100
      div = n_diverged(mr)
      label = f"{method} ({len(mr)} seeds" + (f", {div} diverged)" if div else ")")
      ax.plot(xs, mu, "o-", ms=3, color=colors[method], label=label)
      ax.fill_between(xs, mu - sd, mu + sd, color=colors[method], alpha=0.15)
    ax.set(xlabel="training step", ylabel="test accuracy (%)", title=f"{grid['name']}: {model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / f"{model}_curves.png", dpi=90))
  return paths


def environment(extra_dists: tuple[str, ...] = ()) -> dict:
  """What every result file records (`nio_jax.bench.machine.environment`): devices, CPU
  count, platform, package versions (and of `extra_dists`), the git commit, the UTC date and
  the load average."""
  return machine.environment(extra_dists=extra_dists)


def collect(grid: dict, root, results, plots: bool = True, log=print) -> dict:
  """Writes `table.md`, `table.json`, `significant.md` (`benchmarks.sweep_stats`) and the
  curve plots from the finished runs."""
  out = pathlib.Path(results) / f"sweep_{grid['name']}"
  out.mkdir(parents=True, exist_ok=True)
  records, missing = _records(grid, root, results)
  tab = table(grid, records)
  (out / "table.md").write_text(markdown(grid, tab, missing))
  files.write_json(
    out / "table.json",
    {
      "grid": grid["name"],
      "command": command(),
      "environment": environment(),
      "missing": missing,
      "table": tab,
    },
  )
  sweep_stats.write(grid, results)  # significant.md, from the committed per-run JSON
  pngs = plot_curves(grid, records, out) if plots and records else []
  log(f"[sweep] {out}: {len(records)} runs, {len(missing)} missing, {len(pngs)} plots")
  return {"table": tab, "missing": missing, "plots": [str(p) for p in pngs], "dir": out}


def _commit(paths: list[pathlib.Path], message: str, log=print) -> None:
  """Commits `paths` only (other staged changes stay out of the commit)."""
  subprocess.run(["git", "add", *map(str, paths)], cwd=REPO, check=False)
  r = subprocess.run(
    ["git", "commit", "-qm", message, "--", *map(str, paths)], cwd=REPO, check=False
  )
  log(f"[sweep] git commit: {'ok' if r.returncode == 0 else 'nothing to commit'}")


def run_grid(
  grid: dict,
  root,
  results,
  *,
  only_models=None,
  only_methods=None,
  plots: bool = True,
  commit: bool = False,
  log=print,
) -> dict:
  """Runs (or resumes) every cell in order, collecting after each cell."""
  statuses = []
  for cell in grid["cells"]:
    if (only_models and cell["model"] not in only_models) or (
      only_methods and cell["method"] not in only_methods
    ):
      continue
    for seed in cell["seeds"]:
      rec = run_one(grid, cell, seed, root, results, log=log)
      statuses.append("skipped" if rec.get("skipped") else rec["status"])
    res = collect(grid, root, results, plots=plots, log=log)
    if commit:
      _commit([res["dir"]], f"sweep {grid['name']}: cell {cell['model']}/{cell['method']}", log)
  out = collect(grid, root, results, plots=plots, log=log)
  out["statuses"] = statuses
  return out


def time_one(grid: dict, log=print) -> dict:
  """Runs seed 0 of kaiming and of nio for each model (in a temporary root), prints the
  search / training / evaluation wall times and an estimate of the whole grid."""
  per_model: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    for cell in grid["cells"]:
      if cell["method"] not in ("kaiming", "nio"):
        continue
      t0 = time.perf_counter()
      rec = experiment.train_run(run_config(cell, 0), run_dir(tmp, grid, cell, 0), progress=False)
      wall = time.perf_counter() - t0
      per_model.setdefault(cell["model"], {})[cell["method"]] = {
        "wall": wall,
        **{k: rec.get(k) for k in ("search_seconds", "train_seconds", "eval_seconds")},
      }
      log(
        f"[time-one] {cell['model']}/{cell['method']}: {per_model[cell['model']][cell['method']]}"
      )
  total = 0.0
  for cell in grid["cells"]:
    t = per_model.get(cell["model"], {})
    if "kaiming" not in t:
      continue
    run = t["kaiming"]["wall"]
    search = (t.get("nio") or {}).get("search_seconds") or 0.0
    learned = cell["method"] in ("metainit", "gradinit", "nio")
    total += len(cell["seeds"]) * (run + (search if learned else 0.0))
  log(f"[time-one] estimated grid wall time: {total / 3600:.2f} h (compiles counted per run)")
  return {"models": per_model, "estimate_hours": total / 3600}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--grid", required=True, help="configs/sweep_<name>.py name, or a path")
  p.add_argument("--root", default=str(REPO / "runs" / "sweep"))
  p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
  p.add_argument("--models", nargs="*")
  p.add_argument("--methods", nargs="*")
  p.add_argument("--collect", action="store_true", help="only rebuild table and plots")
  p.add_argument("--time-one", action="store_true", help="time one run of each model")
  p.add_argument("--commit", action="store_true", help="git commit the results after each cell")
  p.add_argument("--no-plots", action="store_true")
  a = p.parse_args(argv)
  global _COMMAND
  _COMMAND = "python -m benchmarks.sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
  grid = load_grid(a.grid)
  if a.time_one:
    time_one(grid)
    return 0
  if a.collect:
    collect(grid, a.root, a.results, plots=not a.no_plots)
    return 0
  run_grid(
    grid,
    a.root,
    a.results,
    only_models=a.models,
    only_methods=a.methods,
    plots=not a.no_plots,
    commit=a.commit,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
