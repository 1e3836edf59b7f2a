"""One experiment run from a config: data, model, initialisation method, GC report, training.

This is the single driver behind `nio-jax init/train/measure` and `benchmarks/sweep.py` (a
sweep is a grid of configs handed to :func:`train_run`). Every step exists once here:

* :func:`build`: loaders, model and its initial variables from a validated config;
* :func:`init_loss_fn` / :func:`measure_params`: the search loss and the GC /
  gradient-norm report (`init.measure_*`: the same setting for every caller);
* :func:`run_init` / :func:`init_run`: the configured method (its batch count from the
  method config, `nio_jax.config.search_batches`);
* :func:`train_run`: init + training + evaluations, with the wall time split into search,
  training and evaluation, written to `run_record.json`;
* saving / loading params and checkpoints, JSON files.

Compiled steps are reused across runs of one process that share a model and settings (e.g.
the seeds of a sweep cell): the searches cache their step on the loss function object, which
:func:`init_loss_fn` returns once per (model, batch-norm or not), and the trainer caches its
train step on (model, config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import serialization

import nio_jax
from nio_jax import data, methods, models
from nio_jax import train as trainmod
from nio_jax.config import ConfigError, method_config, search_batches
from nio_jax.data.loader import Loader
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.models import match_layout
from nio_jax.scales import scales_to_dict
from nio_jax.train.checkpoint import load_msgpack_variables
from nio_jax.train.metrics import gc_records, read_metrics, to_jsonable

RECORD = "run_record.json"


@dataclasses.dataclass
class Run:
  """What :func:`build` returns: the config and the objects it describes."""

  cfg: Any
  model: Any
  variables: dict
  train_loader: Any
  test_set: Any
  image_shape: tuple


_INIT_FNS: dict = {}


def build(cfg) -> Run:
  """Loaders, model and its initial variables from a validated config."""
  d = cfg.data
  try:
    loader, test_set = data.make_loaders(
      d.dataset,
      int(d.batch_size),
      seed=int(cfg.seed),
      data_dir=d.data_dir,
      source=d.source,
      pad_to_32=bool(d.pad_to_32),
      augment=d.augment,
      prefetch=int(d.prefetch),
      train_subset=d.train_subset,
      test_subset=d.test_subset,
    )
  except (FileNotFoundError, ImportError) as e:
    # load_dataset(source="auto") may surface TFDS's ImportError with the file error as
    # its context: show the file error, which says where the files were looked for.
    ctx = e.__context__ if isinstance(e, ImportError) else None
    msg = f"{ctx}; TFDS fallback: {e}" if isinstance(ctx, FileNotFoundError) else str(e)
    raise ConfigError(f"dataset {d.dataset!r} not available: {msg}") from None
  kwargs = cfg.model.kwargs.to_dict()
  kwargs.setdefault("num_classes", data.NUM_CLASSES[d.dataset])
  try:
    model = models.get(cfg.model.name, **kwargs)
  except TypeError as e:
    raise ConfigError(f"model {cfg.model.name!r}: bad model.kwargs {kwargs}: {e}") from None
  shape = tuple(getattr(loader.source, "image_shape", None) or models.input_shape(cfg.model.name))
  # One jitted init per model (eager init compiles every initialiser op separately).
  key = (model, shape)
  if key not in _INIT_FNS:
    _INIT_FNS[key] = jax.jit(lambda k, x: model.init(k, x, train=False))
  variables = _INIT_FNS[key](jax.random.key(int(cfg.seed)), jnp.zeros((1,) + shape, jnp.float32))
  return Run(cfg, model, dict(variables), loader, test_set, shape)


_LOSS_FNS: dict = {}


def init_loss_fn(run: Run, variables: dict | None = None):
  """`(loss_fn, params)` of `variables` (default: the run's initial ones) for the methods.

  One loss function object per (model, training keyword, batch-norm or not) for the whole
  process: the searches and `nio_jax.measure` cache their compiled steps on it, so runs of
  the same model (other seeds) compile once. For batch-norm models the closed-over
  `batch_stats` are the model's initial ones (the same for every seed) and the loss uses
  batch statistics in training mode.
  """
  v = run.variables if variables is None else variables
  kw = run.cfg.train.train_kwarg
  bs = v.get("batch_stats") or None
  key = (run.model, kw, bs is not None)
  if bs is not None and variables is not None:
    key = None  # other batch statistics (e.g. after training): a loss of their own
  if key is None or key not in _LOSS_FNS:
    fn = linen_loss_fn(run.model, batch_stats=bs, apply_kwargs={kw: True} if kw else {})
    if key is None:
      return fn, v["params"]
    _LOSS_FNS[key] = fn
  return _LOSS_FNS[key], v["params"]


def init_batches(run: Run, num: int, stream: int):
  """`num` training batches of `init.batch_size` from loader stream `stream` (0 is the
  training order, 1 the method's, 2 the GC report's)."""
  loader = run.train_loader
  bs = int(run.cfg.init.batch_size or run.cfg.data.batch_size)
  if bs != loader.batch_size:
    loader = Loader(
      loader.source,
      bs,
      seed=loader.seed,
      shuffle=True,
      drop_remainder=True,
      transform=loader.transform,
      prefetch=loader.prefetch,
    )
  return loader.batches(num, stream=stream)


def init_data(run: Run, mcfg):
  """What the method consumes: `search_batches` real batches of `init.batch_size`, or
  MetaInit's shape spec for Gaussian inputs (`init.data="random"`)."""
  cfg = run.cfg
  if cfg.init.data == "random":
    bs = int(cfg.init.batch_size or cfg.data.batch_size)
    return {
      "image": (bs,) + tuple(run.image_shape),
      "num_classes": data.NUM_CLASSES[cfg.data.dataset],
    }
  return init_batches(run, search_batches(cfg, mcfg), stream=1)


def measure_params(
  run: Run, loss_fn, params, *, progress: bool = False, batches: list | None = None
) -> dict | None:
  """GC / gradient norm over `init.measure_batches` batches of loader stream 2 (the same
  batches for every call; `batches`: those batches, drawn once by the caller), with the
  config's `measure_chunks` / `measure_overlap`."""
  k = int(run.cfg.init.measure_batches)
  if k == 0:
    return None
  if batches is None:
    batches = list(init_batches(run, k, stream=2))
  try:
    return nio_jax.measure(
      loss_fn,
      params,
      batches,
      num_batches=k,
      num_chunks=run.cfg.init.measure_chunks,
      overlap=float(run.cfg.init.measure_overlap),
      show_progress=progress,
    )
  except (ValueError, ArithmeticError) as e:  # e.g. a zero gradient: report, do not crash
    return {"error": str(e)}


def gc_tracker(run: Run, loss_fn=None):
  """`gc_fn(variables) -> measure_params(...)` for `train.gc_every`: the GC report of
  :func:`measure_params` (its batches of stream 2, drawn once here, its sub-batch setting
  and leaves) at the params of a training step.

  The loss is :func:`init_loss_fn`'s of the run's initial variables (default: the cached
  one): for batch-norm models it normalises each batch by its own statistics (training
  mode), so the running statistics of the step do not enter, the result equals a
  measurement with that checkpoint's `batch_stats` (`nio-jax measure --checkpoint`), and the
  compiled measurement is reused for every step (and every run of the same model).
  """
  if loss_fn is None:
    loss_fn, _ = init_loss_fn(run)
  batches = list(init_batches(run, int(run.cfg.init.measure_batches), stream=2))
  return lambda variables: measure_params(run, loss_fn, variables["params"], batches=batches)


def run_init(run: Run, loss_fn, params, *, progress: bool = False):
  """Runs the configured method; returns (InitResult, seconds, number of batches)."""
  mcfg = method_config(run.cfg)
  batches = init_data(run, mcfg)
  t0 = time.perf_counter()
  result = methods.initialize(
    run.cfg.init.method, loss_fn, params, batches, mcfg, progress=progress
  )
  jax.block_until_ready(result.params)
  n = 0 if isinstance(batches, dict) else len(batches)
  return result, time.perf_counter() - t0, n


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_json(path, obj) -> pathlib.Path:
  """`obj` as indented JSON (numpy / jax values converted), written atomically."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(to_jsonable(obj), indent=1))
  os.replace(tmp, path)
  return path


def read_json(path, default=None):
  """The JSON in `path`, or `default` when it is missing or unreadable."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return default


def save_variables(path, variables) -> pathlib.Path:
  """Flax msgpack serialization (no pickle) of a variables dict."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_bytes(serialization.to_bytes(jax.device_get(variables)))
  os.replace(tmp, path)
  return path


def load_variables(path, target):
  """Restores msgpack variables into the structure of `target`, in either block layout
  (scanned or unrolled: `models.match_layout`; shapes are checked)."""
  try:
    restored = load_msgpack_variables(path, target)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None
  for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(restored)):
    if getattr(a, "shape", None) != getattr(b, "shape", None):
      raise ConfigError(
        f"{path}: saved params do not match the model of this config "
        f"(shape {getattr(b, 'shape', None)} vs {getattr(a, 'shape', None)})"
      )
  return restored


def checkpoint_steps(ckpt_dir) -> list[int]:
  """Steps of the trainer checkpoints in `ckpt_dir` (sorted; empty when there are none)."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  if not ckpt_dir.is_dir():
    return []
  return sorted(
    int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and (p / "state").is_dir()
  )


def load_checkpoint_variables(ckpt_dir, step: str, target):
  """`{"params", ["batch_stats"]}` of a trainer checkpoint (orbax, `step` or "latest")."""
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


def save_init_outputs(workdir, run: Run, result, seconds, num_batches, before, after) -> None:
  """`init_history.json`, `scales.json` and `init_report.json` of an initialisation."""
  workdir = pathlib.Path(workdir)
  write_json(
    workdir / "init_history.json",
    {
      "seconds": seconds,
      "method": result.method,
      "num_batches": num_batches,
      "history": result.history,
      "config": result.config,
    },
  )
  if result.scales is not None:
    write_json(workdir / "scales.json", scales_to_dict(result.scales))
  write_json(
    workdir / "init_report.json",
    {
      "method": run.cfg.init.method,
      "seconds": seconds,
      "before": before,
      "after": after,
      "model": run.cfg.model.name,
      "dataset": run.cfg.data.dataset,
    },
  )


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def init_run(cfg, workdir, *, progress: bool = False) -> dict:
  """The configured method alone: GC before, the search, GC after; saves
  `init_params.msgpack` and the init files. Returns the init report."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = build(cfg)
  loss_fn, params = init_loss_fn(run)
  before = measure_params(run, loss_fn, params, progress=progress)
  result, seconds, nb = run_init(run, loss_fn, params, progress=progress)
  after = measure_params(run, loss_fn, result.params, progress=progress)
  save_variables(workdir / "init_params.msgpack", {**run.variables, "params": result.params})
  save_init_outputs(workdir, run, result, seconds, nb, before, after)
  return {
    "result": result,
    "seconds": seconds,
    "before": before,
    "after": after,
    "params_path": workdir / "init_params.msgpack",
  }


def is_finished(workdir) -> bool:
  """True when `workdir` holds the record of a finished (or diverged) :func:`train_run`."""
  return bool((read_json(pathlib.Path(workdir) / RECORD) or {}).get("finished"))


def train_run(cfg, workdir, *, progress: bool | None = None) -> dict:
  """Init + training + evaluations of one config; resumes from the trainer's checkpoints.

  The method runs inside the trainer's `init_fn` (so a resumed run does not search again),
  GC / gradient norm are measured before and after it, the test accuracy after each
  `eval.steps` step (first `eval.subset` test images), at each epoch end and, when
  `max_steps` ends the run inside an epoch, at that step (whole test set).

  Returns (and writes to `<workdir>/run_record.json`) the run's record: accuracies, the
  GC report, and wall times `search_seconds`, `train_seconds`, `eval_seconds`,
  `measure_seconds`, `step_seconds` (training seconds per step in this call).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = build(cfg)
  if progress is not None:
    cfg.train.progress = bool(progress)
  progress = bool(cfg.train.progress)
  loss_fn, params0 = init_loss_fn(run)
  start_step = max(checkpoint_steps(workdir / "checkpoints"), default=0)
  resuming = bool(checkpoint_steps(workdir / "checkpoints"))
  t = time.perf_counter()
  before = None if resuming else measure_params(run, loss_fn, params0, progress=progress)
  measure_seconds = time.perf_counter() - t
  mcfg = method_config(cfg)
  own = cfg.init.data == "real" and cfg.init.batch_size in (None, cfg.data.batch_size)
  cfg.train.init_num_batches = search_batches(cfg, mcfg) if own else 1
  holder: dict = {}

  def init_fn(loss_fn_, params, batches):
    data_ = batches if own else init_data(run, mcfg)
    t0 = time.perf_counter()
    res = methods.initialize(cfg.init.method, loss_fn, params, data_, mcfg, progress=progress)
    jax.block_until_ready(res.params)
    holder.update(
      result=res,
      seconds=time.perf_counter() - t0,
      num_batches=0 if isinstance(data_, dict) else len(data_),
    )
    return res

  spe = run.train_loader.steps_per_epoch
  eval_test = run.test_set
  if cfg.eval.subset is not None:
    eval_test = run.test_set.subset(int(cfg.eval.subset))
  eval_at = {int(k): eval_test for k in cfg.eval.steps}
  max_steps = cfg.get("max_steps")
  if max_steps is not None and int(max_steps) % spe:
    # the last step: on the whole test set, or on the subset like the other eval steps
    eval_at[int(max_steps)] = run.test_set if cfg.eval.get("last_on_full_test", True) else eval_test
  try:
    res = trainmod.train(
      run.model,
      run.variables,
      run.train_loader,
      run.test_set,
      cfg.train,
      workdir,
      init_fn=init_fn,
      stop_after_step=None if max_steps is None else int(max_steps),
      eval_at=eval_at,
      gc_fn=gc_tracker(run, loss_fn) if cfg.train.get("gc_every") else None,
    )
    status = "finished"
  except trainmod.NonFiniteLossError as e:  # divergence is a result, not a crash
    res, status = None, f"diverged at step {e.step}"
  after = None
  if "result" in holder:
    r = holder["result"]
    unchanged = all(
      a is b for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(params0), strict=True)
    )
    t = time.perf_counter()
    after = before if unchanged else measure_params(run, loss_fn, r.params, progress=progress)
    measure_seconds += time.perf_counter() - t
    save_variables(workdir / "init_params.msgpack", {**run.variables, "params": r.params})
    save_init_outputs(workdir, run, r, holder["seconds"], holder["num_batches"], before, after)
  prev = read_json(workdir / RECORD) or {}
  record = {
    "name": cfg.name,
    "model": cfg.model.name,
    "method": cfg.init.method,
    "seed": int(cfg.seed),
    "status": status,
    "finished": (
      res is None or res.finished or (max_steps is not None and res.step >= int(max_steps))
    ),
    "step": None if res is None else res.step,
    "steps_per_epoch": spe,
    "acc_steps": {} if res is None else {str(k): v for k, v in res.step_evals.items()},
    "acc_epochs": [] if res is None else [e["test_acc"] for e in res.evals],
    "final_test_acc": None,
    "before": before if before is not None else prev.get("before"),
    "after": after if after is not None else prev.get("after"),
    "search_steps": holder["result"].num_steps if "result" in holder else prev.get("search_steps"),
    "search_seconds": holder.get("seconds", prev.get("search_seconds")),
    "measure_seconds": measure_seconds,
    "train_seconds": None if res is None else res.train_seconds,
    "eval_seconds": None if res is None else res.eval_seconds,
    # `train.gc_every`: {step: GC report (+ its seconds)} over the whole run, from the log
    # (also for a diverged run), and the seconds of the measurements in this call.
    "gc_steps": {str(k): v for k, v in gc_records(read_metrics(workdir / "metrics.jsonl")).items()},
    "gc_seconds": None if res is None else res.gc_seconds,
    "resumed": resuming,
    # The optimiser recipe that ran (no-norm or with normalisation), from the trainer's log.
    "recipe": trainmod.logged_recipe(workdir / "metrics.jsonl"),
  }
  if res is not None:
    if max_steps is not None and int(max_steps) in res.step_evals and int(max_steps) % spe:
      record["final_test_acc"] = res.step_evals[int(max_steps)]
    else:
      record["final_test_acc"] = res.final_test_acc
    record["step_seconds"] = res.train_seconds / max(res.step - start_step, 1)
  if cfg.init.method != "kaiming" and record["search_seconds"] and record.get("step_seconds"):
    record["search_rel_step"] = record["search_seconds"] / record["step_seconds"]
  if "result" in holder and holder["result"].scales is not None:
    record["scales"] = scales_to_dict(holder["result"].scales)
  if res is not None:
    save_variables(workdir / "final_params.msgpack", res.variables)
  write_json(workdir / RECORD, record)
  return record


# --------------------------------------------------------------------------------------------
# Several methods on one config
# --------------------------------------------------------------------------------------------


def compare_methods(cfg, methods_: list[str] | None = None) -> list[str]:
  """The methods `nio-jax compare` runs: `methods_`, else `compare.methods`, else
  `init.method`; unknown names, repeats and an empty list raise ConfigError."""
  names = list(methods_ or cfg.get("compare", {}).get("methods", ()) or [cfg.init.method])
  known = methods.available_methods()
  for m in names:
    if m not in known:
      raise ConfigError(f"unknown initialisation method {m!r}; known: {', '.join(known)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"compare: a method is listed twice in {names}")
  return names


def method_run_config(cfg, method: str):
  """A copy of `cfg` that runs `method`: `init.method`, then `compare.overrides.<method>`
  (`key=value` strings), name `<name>_<method>`; validated."""
  from nio_jax.config import apply_override, parse_override, validate_config  # noqa: PLC0415

  c = cfg.copy_and_resolve_references()
  c.init.method = method
  c.name = f"{cfg.name}_{method}"
  c.workdir = None
  overrides = c.compare.overrides.get(method, ()) if "compare" in c else ()
  if isinstance(overrides, str):
    overrides = (overrides,)
  for item in overrides:
    apply_override(c, *parse_override(item))
  validate_config(c)
  return c


def compare_run(cfg, workdir, *, methods_=None, progress: bool | None = None) -> dict:
  """Runs :func:`train_run` for each method of :func:`compare_methods` on the same config.

  Every method starts from the same seed, hence the same initial params and the same data
  order; each run lives in `<workdir>/<method>` (resumable: a finished run is read back,
  not repeated). Compiled steps are shared where the shapes agree: the model's init, the
  GC report and the training step compile once for all methods (they are cached per model
  and training config; see the module docstring).

  Returns `{"methods": [...], "records": {method: run record}, "seconds": {method: wall
  seconds of this call}, "reused": [methods read back], "wall_seconds": total}`.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = compare_methods(cfg, methods_)
  configs = {m: method_run_config(cfg, m) for m in names}  # every config checked first
  out: dict = {"methods": names, "records": {}, "seconds": {}, "reused": []}
  t_all = time.perf_counter()
  for m in names:
    d = workdir / m
    if is_finished(d):
      out["records"][m] = read_json(d / RECORD)
      out["reused"].append(m)
      out["seconds"][m] = 0.0
      continue
    if progress is not None:
      configs[m].train.progress = bool(progress)
    print(f"[nio-jax compare] {m}: {d}", flush=True)
    t = time.perf_counter()
    out["records"][m] = train_run(configs[m], d)
    out["seconds"][m] = time.perf_counter() - t
  out["wall_seconds"] = time.perf_counter() - t_all
  write_json(workdir / "compare.json", out)
  return out
