"""Experiment runner: a grid of (model x init method x seed), resumable, with one results table.

    python -m benchmarks.sweep --grid fmnist            # configs/sweep_fmnist.py
    python -m benchmarks.sweep --grid fmnist --collect  # only rebuild table + plots
    python -m benchmarks.sweep --grid mini --root /tmp/runs --results /tmp/res   # built-in tiny grid

Every run lives in ``<root>/<grid>/<model>/<method>/seed<k>`` (default root ``runs/sweep``) and
holds the trainer's files (``metrics.jsonl``, ``checkpoints/``, ``summary.json``,
``init_history.json``) plus ``sweep_init.json`` (GradCosine before/after the search, the learned
scales, search wall time), ``sweep_evals.json`` (test accuracy at the fixed early steps) and
``sweep_run.json`` (the finished run's record). A re-run skips runs whose ``summary.json`` says
finished and resumes half-done ones through the trainer's checkpoints.

The collected table (``<results>/sweep_<grid>.md`` and ``.json``) has, per model and method,
mean ± std over seeds of: test accuracy after ``eval_steps`` steps, Acc_1 (after the first
epoch run), Acc_best, GradCosine before -> after the search, and the search's wall time relative
to one training epoch. Plots: ``sweep_<grid>_<model>_curves.png`` (test accuracy and training
loss against step per method), ``sweep_<grid>_gc.png`` (GC before/after), and
``sweep_<grid>_scales.png`` (learned scale per layer).

A grid is a dict (see ``GRIDS["mini"]`` and ``configs/sweep_fmnist.py``):

    dataset, pad_to_32, batch_size, train_subset, test_subset, data_seed_offset
    epochs, seeds, eval_steps, log_every, measure_batches, measure_chunks
    train:   overrides of nio_jax.train.default_config() for every run
    methods: {name: {"init": registry method, "config": dict | recipe name,
                     "init_batch_size": slice batches for the search to this size,
                     "train": overrides, "model_kwargs": overrides,
                     "data": "real" | "random" (MetaInit shape spec)}}
    models:  {name: {"model": registry name, "kwargs": {...}, "methods": [names],
                     "train": overrides, "method_overrides": {method: {...}}}}
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# Built-in grids. "mini" is the test's grid: 2 methods x 1 seed x an MLP x a few steps.
GRIDS: dict[str, dict] = {
  "mini": {
    "dataset": "fashion_mnist",
    "pad_to_32": False,
    "batch_size": 32,
    "train_subset": 192,
    "test_subset": 100,
    "epochs": 1,
    "seeds": [0],
    "eval_steps": [3],
    "log_every": 2,
    "measure_batches": 1,
    "measure_chunks": 4,
    "train": {"lr": 0.05},
    "methods": {
      "kaiming": {"init": "kaiming"},
      "nio": {
        "init": "nio",
        "config": {"num_steps": 2, "num_chunks": 4, "overlap": 0.2, "gamma": 10.0, "lr": 3e-3},
      },
    },
    "models": {"mlp": {"model": "mlp", "kwargs": {}, "methods": ["kaiming", "nio"]}},
  },
}


# ----------------------------------------------------------------------------- grid handling


def load_grid(name: str) -> dict:
  """A built-in grid, or ``configs/sweep_<name>.py:get_grid()``, or a path to such a file."""
  if name in GRIDS:
    grid = copy.deepcopy(GRIDS[name])
  else:
    path = pathlib.Path(name)
    if not path.exists():
      path = REPO / "configs" / f"sweep_{name}.py"
    if not path.exists():
      raise SystemExit(f"unknown grid {name!r}: not built in ({', '.join(GRIDS)}) and no {path}")
    spec = importlib.util.spec_from_file_location(f"sweep_grid_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    grid = mod.get_grid()
    name = path.stem.removeprefix("sweep_")
  grid.setdefault("name", name)
  return grid


def expand(
  grid: dict,
  models: list[str] | None = None,
  methods: list[str] | None = None,
  seeds: list[int] | None = None,
) -> list[dict]:
  """All runs of the grid, in a fixed order (seed-major so that every method gets its first
  seed before anyone gets a second)."""
  runs = []
  for seed in grid["seeds"]:
    if seeds is not None and seed not in seeds:
      continue
    for mname, mdef in grid["models"].items():
      if models is not None and mname not in models:
        continue
      # --methods also sets the order (e.g. the searches before the baselines)
      order = [m for m in methods if m in mdef["methods"]] if methods else mdef["methods"]
      for meth in order:
        spec = copy.deepcopy(grid["methods"][meth])
        over = mdef.get("method_overrides", {}).get(meth, {})
        for k, v in over.items():
          if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
          else:
            spec[k] = v
        runs.append(
          {"model": mname, "method": meth, "seed": int(seed), "model_def": mdef, "method_def": spec}
        )
  return runs


def run_dir(root: pathlib.Path, grid: dict, run: dict) -> pathlib.Path:
  return root / grid["name"] / run["model"] / run["method"] / f"seed{run['seed']}"


def _read_json(path: pathlib.Path, default=None):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return default


def _write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return repr(x)


def is_finished(workdir: pathlib.Path) -> bool:
  s = _read_json(workdir / "summary.json", {})
  return bool(s.get("finished")) and (workdir / "sweep_run.json").exists()


# ----------------------------------------------------------------------------- one run

_DATA_CACHE: dict = {}


def _loaders(grid: dict, seed: int):
  from nio_jax import data

  key = (
    grid["dataset"],
    grid["batch_size"],
    seed,
    grid.get("pad_to_32", False),
    grid.get("train_subset"),
    grid.get("test_subset"),
  )
  if key not in _DATA_CACHE:
    _DATA_CACHE[key] = data.make_loaders(
      grid["dataset"],
      grid["batch_size"],
      seed=seed,
      pad_to_32=grid.get("pad_to_32", False),
      train_subset=grid.get("train_subset"),
      test_subset=grid.get("test_subset"),
    )
  return _DATA_CACHE[key]


_EVAL_CACHE: dict = {}


def _test_arrays(test) -> tuple[np.ndarray, np.ndarray]:
  key = id(test)
  if key not in _EVAL_CACHE:
    mean = np.asarray(test.mean, np.float32)
    std = np.asarray(test.std, np.float32)
    x = (test.images.astype(np.float32) / 255.0 - mean) / std
    _EVAL_CACHE[key] = (x, np.asarray(test.labels, np.int32))
  return _EVAL_CACHE[key]


_EVAL_FNS: dict = {}


def evaluate(model, variables, test, batch_size: int = 500) -> float:
  """Test accuracy of ``variables`` (eval mode, running BN statistics)."""
  import jax
  import jax.numpy as jnp

  if model not in _EVAL_FNS:

    @jax.jit
    def correct(v, x, y):
      logits = model.apply(v, x, train=False)
      return jnp.sum(jnp.argmax(logits, -1) == y)

    _EVAL_FNS[model] = correct
  x, y = _test_arrays(test)
  n = len(y)
  bs = min(batch_size, n)
  tot = 0
  for i in range(0, n - n % bs, bs):
    tot += int(_EVAL_FNS[model](variables, x[i : i + bs], y[i : i + bs]))
  if n % bs:  # one smaller, separately compiled batch for the remainder
    tot += int(_EVAL_FNS[model](variables, x[n - n % bs :], y[n - n % bs :]))
  return tot / n


def _train_config(grid: dict, run: dict):
  from nio_jax import train

  cfg = train.default_config()
  over = {
    **grid.get("train", {}),
    **run["model_def"].get("train", {}),
    **run["method_def"].get("train", {}),
  }
  cfg.num_epochs = int(grid["epochs"])
  cfg.batch_size = int(grid["batch_size"])
  # The trainer's seed only seeds dropout (off in every model); keeping it (and
  # init_num_batches) the same for all runs lets runs share the compiled train step, which is
  # cached on the config. Seeds differ in model init and data order (loader seed).
  cfg.seed = 0
  cfg.progress = False
  cfg.log_every = int(grid.get("log_every", 10))
  cfg.max_to_keep = 2
  for k, v in over.items():
    cfg[k] = v
  return cfg


def _init_steps(spec: dict) -> int:
  conf = spec.get("config")
  if "num_steps" in spec.get("config_overrides", {}):
    n = int(spec["config_overrides"]["num_steps"])
  elif isinstance(conf, dict) and "num_steps" in conf:
    n = int(conf["num_steps"])
  elif spec["init"] in ("kaiming", "fixup"):
    return 1
  else:
    n = 100
  return 2 * n if spec["init"].startswith("gradinit") else n


def _method_config(spec: dict, seed: int):
  conf = spec.get("config")
  if isinstance(conf, str):  # GradInit recipe name (+ "overrides")
    from nio_jax.methods import GradInitConfig

    base = GradInitConfig.create(conf)
    import dataclasses

    d = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    d.update(spec.get("config_overrides", {}))
    return d
  conf = dict(conf or {})
  if spec["init"] == "metainit" and spec.get("data") == "random":
    conf.setdefault("seed", seed)
  return conf or None


_LOSS_FNS: dict = {}
_NIO_STEPS: dict = {}


def _shared_loss_fn(model, variables, loss_fn):
  """One loss function object per (model, BN or not) for the whole process.

  The searches' compiled steps (and `nio_jax.measure`) are cached on the loss function
  object, so handing every seed the same object compiles each search once per model instead
  of once per run. For BN models the closed-over `batch_stats` are the initial ones (zeros /
  ones for every seed) and are only used in training mode (batch statistics) anyway.
  """
  from nio_jax.flax_utils import linen_loss_fn

  bs = variables.get("batch_stats") or None
  try:
    key = (model, bs is not None)
    hash(key)
  except TypeError:
    return loss_fn
  if key not in _LOSS_FNS:
    _LOSS_FNS[key] = linen_loss_fn(model, batch_stats=bs, apply_kwargs={"train": True})
  return _LOSS_FNS[key]


def _install_nio_step_cache():
  """`nio_jax.nio` builds a fresh jitted step per call; memoise it on (loss_fn, scale spec,
  config) so the seeds of one model reuse one compile (the step itself is unchanged)."""
  import jax

  import nio_jax.nio_search as ns

  if getattr(ns.make_nio_step, "_sweep_cached", False):
    return
  orig = ns.make_nio_step

  def cached(loss_fn, spec, config=None, mesh=None):
    if mesh is not None:
      return orig(loss_fn, spec, config, mesh=mesh)
    leaves, tdef = jax.tree_util.tree_flatten(spec)
    key = (id(loss_fn), str(tdef), tuple(np.asarray(l).tobytes() for l in leaves), repr(config))
    if key not in _NIO_STEPS:
      _NIO_STEPS[key] = (loss_fn, orig(loss_fn, spec, config))
    return _NIO_STEPS[key][1]

  cached._sweep_cached = True
  ns.make_nio_step = cached


def make_init_fn(grid: dict, run: dict, workdir: pathlib.Path, model, variables):
  """The trainer's ``init_fn``: GC before, the method's search, GC after, scales, timing."""
  import jax

  import nio_jax
  from nio_jax.methods import initialize
  from nio_jax.scales import scales_to_dict

  spec = run["method_def"]
  nb = int(grid.get("measure_batches", 0))
  chunks = grid.get("measure_chunks", 4)

  def sliced(batches, size):
    if not size:
      return batches
    return [{k: v[:size] for k, v in b.items()} for b in batches]

  def init_fn(loss_fn, params, batches):
    loss_fn = _shared_loss_fn(model, variables, loss_fn)
    _install_nio_step_cache()
    batches = list(batches)
    rec: dict[str, Any] = {"method": spec["init"]}
    # GC before/after on the last batches of the init stream, at the grid's batch size
    # (the same batches for every method of a seed).
    mbatches = batches[-nb:] if nb else []
    if nb:
      t = time.perf_counter()
      rec["gc_before"] = nio_jax.measure(
        loss_fn, params, mbatches, num_batches=nb, num_chunks=chunks, overlap=0.0
      )
      rec["measure_seconds"] = time.perf_counter() - t
    ib = int(spec.get("init_batch_size") or 0)
    if spec.get("data") == "random":
      b0 = batches[0]
      data = {
        "image": (ib or len(b0["label"]),) + tuple(b0["image"].shape[1:]),
        "num_classes": int(grid.get("num_classes", 10)),
      }
    else:
      data = sliced(batches, ib)
    t = time.perf_counter()
    res = initialize(spec["init"], loss_fn, params, data, _method_config(spec, run["seed"]))
    jax.block_until_ready(res.params)
    rec["search_seconds"] = time.perf_counter() - t
    rec["search_steps"] = res.num_steps
    if res.scales is not None:
      rec["scales"] = scales_to_dict(res.scales)
    hist = {k: np.asarray(v).tolist() for k, v in (res.history or {}).items()}
    rec["history_last"] = {k: (v[-1] if v else None) for k, v in hist.items()}
    rec["history_first"] = {k: (v[0] if v else None) for k, v in hist.items()}
    if nb:
      rec["gc_after"] = nio_jax.measure(
        loss_fn, res.params, mbatches, num_batches=nb, num_chunks=chunks, overlap=0.0
      )
    _write_json(workdir / "sweep_init.json", rec)
    return res

  return init_fn


def _latest_ckpt(workdir: pathlib.Path) -> int:
  d = workdir / "checkpoints"
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
  return max(steps, default=-1)


def run_one(
  grid: dict, run: dict, root: pathlib.Path, log=print, stop_after_evals: bool = False
) -> dict:
  """Trains one (model, method, seed); returns its record. Skips a finished run.

  ``stop_after_evals``: return (status "partial") once the early-step evaluations are done,
  leaving a half-done run for a later call to resume (used by the tests)."""

  workdir = run_dir(root, grid, run)
  tag = f"{run['model']}/{run['method']}/seed{run['seed']}"
  if is_finished(workdir):
    log(f"[sweep] skip {tag} (finished)")
    rec = _read_json(workdir / "sweep_run.json")
    rec["status"] = "skipped"
    return rec
  workdir.mkdir(parents=True, exist_ok=True)
  if not _lock(workdir):
    log(f"[sweep] skip {tag} (another process holds {workdir / '.sweep.lock'})")
    return {
      "model": run["model"],
      "method": run["method"],
      "seed": run["seed"],
      "status": "locked",
      "workdir": str(workdir),
    }
  try:
    return _run_one(grid, run, workdir, tag, log, stop_after_evals)
  finally:
    (workdir / ".sweep.lock").unlink(missing_ok=True)


def _lock(workdir: pathlib.Path) -> bool:
  """One process per run directory (several shards may share a grid); a lock whose process
  is gone is taken over."""
  path = workdir / ".sweep.lock"
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(path.read_text().strip() or 0)
        os.kill(pid, 0)
        return pid == os.getpid()
      except (ValueError, ProcessLookupError, FileNotFoundError):
        path.unlink(missing_ok=True)
        continue
      except PermissionError:
        return False
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return True
  return False


def _run_one(grid, run, workdir, tag, log, stop_after_evals):
  import jax
  import jax.numpy as jnp

  from nio_jax import models, train

  t_run = time.perf_counter()
  mdef, spec = run["model_def"], run["method_def"]
  kwargs = {**mdef.get("kwargs", {}), **spec.get("model_kwargs", {})}
  model = models.get(mdef["model"], **kwargs)
  loader, test = _loaders(grid, run["seed"])
  shape = tuple(test.images.shape[1:])
  variables = model.init(jax.random.key(run["seed"]), jnp.zeros((1,) + shape), train=False)
  variables = dict(variables)
  cfg = _train_config(grid, run)
  cfg.init_num_batches = max(
    [_init_steps(r["method_def"]) for r in expand(grid)] + [int(grid.get("measure_batches", 0)), 1]
  )
  needs_search = spec["init"] not in ("kaiming",)
  init_fn = (
    make_init_fn(grid, run, workdir, model, variables)
    if (needs_search or grid.get("measure_batches"))
    else None
  )
  resumed = _latest_ckpt(workdir) >= 0
  log(f"[sweep] {'resume' if resumed else 'start'} {tag}")
  evals = _read_json(workdir / "sweep_evals.json", {})
  for k in grid.get("eval_steps", []):
    if str(k) in evals or _latest_ckpt(workdir) >= k:
      continue
    r = train.train(
      model, variables, loader, test, cfg, workdir, init_fn=init_fn, stop_after_step=k
    )
    evals[str(k)] = evaluate(model, r.variables, test)
    _write_json(workdir / "sweep_evals.json", evals)
    log(f"[sweep]   {tag} step {k}: test acc {evals[str(k)]:.4f}")
  if stop_after_evals:
    return {
      "model": run["model"],
      "method": run["method"],
      "seed": run["seed"],
      "status": "partial",
      "acc_steps": evals,
      "workdir": str(workdir),
    }
  try:
    r = train.train(model, variables, loader, test, cfg, workdir, init_fn=init_fn)
    status = "finished"
  except train.NonFiniteLossError as e:  # divergence is a result, not a crash
    log(f"[sweep]   {tag}: {e}")
    r, status = None, "diverged"
    _write_json(workdir / "summary.json", {"finished": True, "diverged": True, "step": e.step})
  init = _read_json(workdir / "sweep_init.json", {})
  ih = _read_json(workdir / "init_history.json", {})
  metrics = (
    [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if (workdir / "metrics.jsonl").exists()
    else []
  )
  ev = [m for m in metrics if m.get("type") == "eval"]
  epoch_times = [m["epoch_time"] for m in ev]
  # Steady-state epoch time: the last epoch (no compile, no mid-epoch stop in it).
  epoch_time = epoch_times[-1] if epoch_times else None
  rec = {
    "model": run["model"],
    "method": run["method"],
    "seed": run["seed"],
    "status": status,
    "workdir": str(workdir),
    "acc_1": r.acc_1 if r else None,
    "acc_1_main": r.acc_1_main if r else None,
    "acc_best": r.acc_best if r else None,
    "final_test_acc": r.final_test_acc if r else None,
    "acc_steps": evals,
    "step": r.step if r else None,
    "evals": [
      {k: m[k] for k in ("step", "epoch", "test_acc", "train_loss", "epoch_time")} for m in ev
    ],
    "train_curve": [
      {k: m[k] for k in ("step", "loss", "acc")} for m in metrics if m.get("type") == "train"
    ],
    "gc_before": init.get("gc_before"),
    "gc_after": init.get("gc_after"),
    "scales": init.get("scales"),
    "search_seconds": init.get("search_seconds"),
    "search_steps": init.get("search_steps"),
    "init_seconds_total": ih.get("seconds"),
    "history_first": init.get("history_first"),
    "history_last": init.get("history_last"),
    "epoch_time": epoch_time,
    "epoch_times": epoch_times,
    "search_rel_epoch": (
      init["search_seconds"] / epoch_time
      if init.get("search_seconds") and epoch_time
      else (0.0 if spec["init"] == "kaiming" else None)
    ),
    "steps_per_epoch": loader.steps_per_epoch,
    "run_seconds": time.perf_counter() - t_run,
  }
  _write_json(workdir / "sweep_run.json", rec)
  log(
    f"[sweep] done {tag}: acc@{list(evals)} {[round(v, 4) for v in evals.values()]} "
    f"acc_1 {rec['acc_1']} acc_best {rec['acc_best']} ({rec['run_seconds']:.0f}s)"
  )
  return rec


# ----------------------------------------------------------------------------- collect


def _ms(vals):
  vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not vals:
    return None, None, 0
  a = np.asarray(vals, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def _fmt(m, s, n, pct=True, digits=1):
  if m is None:
    return "–"
  f = 100.0 if pct else 1.0
  if n > 1:
    return f"{m * f:.{digits}f} ± {s * f:.{digits}f}"
  return f"{m * f:.{digits}f}"


def environment() -> dict:
  import jax

  vers = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax.checkpoint", "ml_collections"):
    try:
      m = importlib.import_module(mod)
      vers[mod] = getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001
      pass
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
  except OSError:
    commit = ""
  return {
    "devices": [str(d) for d in jax.devices()],
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "processor": platform.processor(),
    "versions": vers,
    "git_commit": commit,
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def collect(
  grid: dict, root: pathlib.Path, results: pathlib.Path, plots: bool = True, log=print
) -> dict:
  """Reads every run record of the grid and writes the JSON, markdown table and plots."""
  results.mkdir(parents=True, exist_ok=True)
  runs = expand(grid)
  records, missing = [], []
  for run in runs:
    rec = _read_json(run_dir(root, grid, run) / "sweep_run.json")
    if rec is None:
      missing.append(f"{run['model']}/{run['method']}/seed{run['seed']}")
    else:
      records.append(rec)
  table: dict[str, dict[str, dict]] = {}
  for mname, mdef in grid["models"].items():
    table[mname] = {}
    for meth in mdef["methods"]:
      rs = [r for r in records if r["model"] == mname and r["method"] == meth]
      if not rs:
        continue
      row = {
        "seeds": sorted(r["seed"] for r in rs),
        "diverged": sum(r["status"] == "diverged" for r in rs),
      }
      for key in ("acc_1", "acc_1_main", "acc_best", "epoch_time"):
        row[key] = _ms([r.get(key) for r in rs])
      # The first seed's search includes the XLA compile of the search step; later seeds
      # reuse it (same loss function object), so their time is the search itself.
      first = min(r["seed"] for r in rs)
      warm = [r for r in rs if r["seed"] != first] or rs
      row["search_includes_compile"] = all(r["seed"] == first for r in warm)
      row["search_seconds_first_seed"] = _ms(
        [r.get("search_seconds") for r in rs if r["seed"] == first]
      )
      for key in ("search_seconds", "search_rel_epoch"):
        row[key] = _ms([r.get(key) for r in warm])
      for k in grid.get("eval_steps", []):
        row[f"acc_step{k}"] = _ms([r["acc_steps"].get(str(k)) for r in rs])
      for key in ("gc_before", "gc_after"):
        row[key] = _ms([(r.get(key) or {}).get("gc") for r in rs])
        row[key.replace("gc", "gn")] = _ms([(r.get(key) or {}).get("grad_norm") for r in rs])
      table[mname][meth] = row
  out = {
    "grid": grid["name"],
    "protocol": _protocol(grid),
    "environment": environment(),
    "missing_runs": missing,
    "table": table,
    "runs": records,
  }
  jpath = results / f"sweep_{grid['name']}.json"
  _write_json(jpath, out)
  md = markdown(grid, table, out)
  (results / f"sweep_{grid['name']}.md").write_text(md)
  pngs = make_plots(grid, records, results) if plots and records else []
  log(
    f"[sweep] wrote {jpath}, {jpath.with_suffix('.md')}"
    f"{', ' + ', '.join(p.name for p in pngs) if pngs else ''}; {len(records)} runs, "
    f"{len(missing)} missing"
  )
  out["plots"] = [str(p) for p in pngs]
  return out


def _protocol(grid: dict) -> dict:
  g = copy.deepcopy(grid)
  return json.loads(json.dumps(g, default=_jsonable))


def markdown(grid: dict, table: dict, out: dict) -> str:
  env = out["environment"]
  ks = grid.get("eval_steps", [])
  lines = [
    f"# Sweep `{grid['name']}`",
    "",
    f"{grid['dataset']}, train subset {grid.get('train_subset') or 'all'}, test subset "
    f"{grid.get('test_subset') or 'all'}, batch {grid['batch_size']}, "
    f"{grid['epochs']} epoch(s) (+1 for the warmup baseline), seeds {grid['seeds']}. "
    f"Accuracies in % (test), mean ± std over seeds (sample std).",
    f"Device: {env['backend']} ({', '.join(env['devices'])}), {env['cpu_count']} cores; "
    f"jax {env['versions'].get('jax')}, flax {env['versions'].get('flax')}; "
    f"{env['date_utc']}; commit {env['git_commit'][:10]}.",
    "",
  ]
  if out["missing_runs"]:
    lines += [f"Missing (not run / not finished): {', '.join(out['missing_runs'])}.", ""]
  head = (
    ["method", "seeds"]
    + [f"Acc@{k} steps" for k in ks]
    + [
      "Acc_1",
      "Acc_1 main",
      "Acc_best",
      "GC before → after",
      "grad norm before → after",
      "search s",
      "search / epoch",
    ]
  )
  for mname, rows in table.items():
    mdef = grid["models"][mname]
    kw = ", ".join(f"{k}={v}" for k, v in mdef.get("kwargs", {}).items())
    lines += [
      f"## {mname} (`{mdef['model']}`{', ' + kw if kw else ''})",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * len(head),
    ]
    for meth, r in rows.items():
      gcb, gca = r["gc_before"], r["gc_after"]
      gnb, gna = r["gn_before"], r["gn_after"]
      gc = f"{gcb[0]:.3f} → {gca[0]:.3f}" if gcb[0] is not None and gca[0] is not None else "–"
      gn = f"{gnb[0]:.3g} → {gna[0]:.3g}" if gnb[0] is not None and gna[0] is not None else "–"
      seeds = f"{len(r['seeds'])}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
      cells = (
        [meth, seeds]
        + [_fmt(*r[f"acc_step{k}"]) for k in ks]
        + [
          _fmt(*r["acc_1"]),
          _fmt(*r["acc_1_main"]),
          _fmt(*r["acc_best"]),
          gc,
          gn,
          _fmt(*r["search_seconds"], pct=False, digits=0)
          + ("*" if r["search_includes_compile"] and (r["search_seconds"][0] or 0) > 0.05 else ""),
          _fmt(*r["search_rel_epoch"], pct=False, digits=2),
        ]
      )
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  lines += [
    "Acc@k: test accuracy after k optimiser steps (the warmup baseline is then inside "
    "its extra epoch). Acc_1: after the first epoch that ran (for `warmup`, the extra "
    "warmup epoch); Acc_1 main: after the first epoch of the main schedule (= Acc_1 except "
    "for `warmup`, where it is after 2 epochs). Search s: wall time of the init search on the seeds after the first "
    "(they reuse the compiled search step; * = only the first seed ran, time incl. "
    "the XLA compile); search / epoch: that time over the wall time of one (the "
    "last) training epoch of the same run. "
    "GC: batch GradCosine over D = "
    f"{grid.get('measure_chunks', 4)} sub-batches of the grid's batch, "
    f"{grid.get('measure_batches', 0)} batch(es), `nio_jax.measure`.",
    "",
  ]
  return "\n".join(lines)


def make_plots(grid: dict, records: list[dict], results: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = []
  name = grid["name"]
  colors = {}
  cmap = plt.get_cmap("tab10")
  for i, m in enumerate(grid["methods"]):
    colors[m] = cmap(i % 10)
  for mname, mdef in grid["models"].items():
    rs = [r for r in records if r["model"] == mname]
    if not rs:
      continue
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for meth in mdef["methods"]:
      mr = [r for r in rs if r["method"] == meth]
      if not mr:
        continue
      # test accuracy: fixed early steps + epoch ends, mean ± std over seeds
      pts: dict[int, list[float]] = {}
      for r in mr:
        for k, v in r["acc_steps"].items():
          pts.setdefault(int(k), []).append(v)
        for e in r["evals"]:
          pts.setdefault(int(e["step"]), []).append(e["test_acc"])
      xs = sorted(pts)
      mu = np.array([np.mean(pts[x]) for x in xs])
      sd = np.array([np.std(pts[x]) for x in xs])
      ax1.plot(xs, mu * 100, "o-", color=colors[meth], label=meth, ms=3)
      ax1.fill_between(xs, (mu - sd) * 100, (mu + sd) * 100, color=colors[meth], alpha=0.15)
      curves: dict[int, list[float]] = {}
      for r in mr:
        for c in r["train_curve"]:
          curves.setdefault(int(c["step"]), []).append(c["loss"])
      xs = sorted(curves)
      if xs:
        ax2.plot(xs, [np.mean(curves[x]) for x in xs], "-", color=colors[meth], label=meth)
    ax1.set_xlabel("step")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"{mname}: test accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (window mean)")
    ax2.set_yscale("log")
    ax2.set_title(f"{mname}: training loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    p = results / f"sweep_{name}_{mname}_curves.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)

  # GC before / after the search, per model and method (mean over seeds)
  gc_rows = [
    (
      r["model"],
      r["method"],
      (r.get("gc_before") or {}).get("gc"),
      (r.get("gc_after") or {}).get("gc"),
    )
    for r in records
  ]
  gc_rows = [g for g in gc_rows if g[2] is not None and g[3] is not None]
  if gc_rows:
    mnames = [m for m in grid["models"] if any(g[0] == m for g in gc_rows)]
    fig, axes = plt.subplots(1, len(mnames), figsize=(3.6 * len(mnames), 3.4), squeeze=False)
    for ax, mname in zip(axes[0], mnames):
      meths = [
        m
        for m in grid["models"][mname]["methods"]
        if any(g[0] == mname and g[1] == m for g in gc_rows)
      ]
      xs = np.arange(len(meths))
      for j, key in enumerate((2, 3)):
        vals = [np.mean([g[key] for g in gc_rows if g[0] == mname and g[1] == m]) for m in meths]
        ax.bar(
          xs + (j - 0.5) * 0.38,
          vals,
          0.38,
          label=("before", "after")[j],
          color=("#999999", "#1f77b4")[j],
        )
      ax.set_xticks(xs)
      ax.set_xticklabels(meths, rotation=45, ha="right", fontsize=8)
      ax.set_title(mname, fontsize=9)
      ax.axhline(0, color="k", lw=0.5)
      ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("batch GradCosine")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    p = results / f"sweep_{name}_gc.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)

  # Learned scale per layer (seed with the smallest id), one panel per model
  sc = [r for r in records if r.get("scales")]
  if sc:
    mnames = [m for m in grid["models"] if any(r["model"] == m for r in sc)]
    fig, axes = plt.subplots(len(mnames), 1, figsize=(11, 2.8 * len(mnames)), squeeze=False)
    for ax, mname in zip(axes[:, 0], mnames):
      seeds_shown = set()
      for meth in grid["models"][mname]["methods"]:
        mr = sorted(
          [r for r in sc if r["model"] == mname and r["method"] == meth], key=lambda r: r["seed"]
        )
        if not mr:
          continue
        seeds_shown.add(mr[0]["seed"])
        vals = []
        for path, v in mr[0]["scales"].items():
          if path.split("/")[-1].startswith("bias"):
            continue  # biases start at 0 (frozen); plot the weight tensors
          v = np.atleast_1d(np.asarray(v, np.float64)).ravel()
          vals.extend(v.tolist())  # scanned stacks: one scale per block
        ax.plot(np.arange(len(vals)), vals, ".-", color=colors[meth], label=meth, ms=3, lw=0.8)
      ax.axhline(1.0, color="k", lw=0.5)
      ax.set_yscale("log")
      ax.set_ylabel("scale")
      ax.set_title(
        f"{mname}: learned scale per weight tensor (seed {min(seeds_shown)}, tree order)",
        fontsize=9,
      )
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    axes[-1][0].set_xlabel("weight tensor (parameter-tree order; biases omitted)")
    fig.tight_layout()
    p = results / f"sweep_{name}_scales.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)
  return out


# ----------------------------------------------------------------------------- driver


def run_grid(
  grid: dict,
  root: pathlib.Path,
  results: pathlib.Path,
  *,
  models=None,
  methods=None,
  seeds=None,
  shard: tuple[int, int] = (0, 1),
  deadline: float | None = None,
  collect_every: bool = True,
  plots: bool = True,
  log=print,
) -> dict:
  """Runs (or resumes) every run of the grid, then collects. ``deadline`` (unix time): no new
  run starts after it."""
  runs = expand(grid, models, methods, seeds)
  i, n = shard
  runs = [r for j, r in enumerate(runs) if j % n == i]
  statuses = []
  for run in runs:
    if (
      deadline is not None and time.time() > deadline and not is_finished(run_dir(root, grid, run))
    ):
      log(f"[sweep] deadline passed; not starting {run['model']}/{run['method']}/seed{run['seed']}")
      continue
    rec = run_one(grid, run, root, log=log)
    statuses.append(rec.get("status"))
    if collect_every and rec.get("status") in ("finished", "diverged"):
      collect(grid, root, results, plots=False, log=lambda *_: None)
  out = collect(grid, root, results, plots=plots, log=log)
  out["statuses"] = statuses
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--grid", required=True, help="built-in name, configs/sweep_<name>.py, or path")
  p.add_argument("--root", default=str(REPO / "runs" / "sweep"))
  p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
  p.add_argument("--models", nargs="*")
  p.add_argument("--methods", nargs="*")
  p.add_argument("--seeds", nargs="*", type=int)
  p.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
  p.add_argument("--deadline", default=None, help="HH:MM UTC: start no run after it")
  p.add_argument("--collect", action="store_true", help="only rebuild table and plots")
  p.add_argument("--no-plots", action="store_true")
  a = p.parse_args(argv)
  grid = load_grid(a.grid)
  root, results = pathlib.Path(a.root), pathlib.Path(a.results)
  if a.collect:
    collect(grid, root, results, plots=not a.no_plots)
    return
  deadline = None
  if a.deadline:
    hh, mm = (int(x) for x in a.deadline.split(":"))
    now = datetime.datetime.now(datetime.UTC)
    d = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    deadline = d.timestamp()
  i, n = (int(x) for x in a.shard.split("/"))
  run_grid(
    grid,
    root,
    results,
    models=a.models,
    methods=a.methods,
    seeds=a.seeds,
    shard=(i, n),
    deadline=deadline,
    plots=not a.no_plots,
  )


if __name__ == "__main__":
  sys.exit(main())
