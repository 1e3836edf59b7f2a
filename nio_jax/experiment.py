"""One experiment run from a config: the one ordered place that decides a run.

`train_run(cfg, workdir)` is what `nio-jax train` and `benchmarks/sweep.py` call (a sweep is
a grid of configs). Like big_vision's `train.py` it decides the start of training in one
place, in this order:

1. build: loaders, model and its initial variables, the method config (`build`);
2. resume: decided here, once: when `<workdir>/checkpoints` holds a checkpoint
   (`files.checkpoint_steps`), the trainer continues from the latest one (passed down as
   `train(..., resume_step=)`) and nothing is searched again;
3. initialise, on a fresh start only: the GC report before, the method, the GC report after,
   and the init files (`initialise`);
4. train from the initialised variables (`nio_jax.train.train`; its checkpoint 0 holds them);
5. record: `run_record.json`, the one record of a run, which `nio_jax.reports` and the sweep
   read.

`init_run` is `nio-jax init` (steps 1 and 3); `compare_run` is `nio-jax compare` (a
`train_run` per method); `measure_run` is `nio-jax measure`. `start_run` makes the workdir
the run's home (`check_workdir`, `config.json`, `run.json`) for every command. The GC report (`init.measure_*`) is `measure_params`, the same for
every caller.

Compiled steps are reused across runs of one process that share a model and settings (e.g.
the seeds of a sweep cell): the searches cache their step on the loss function object, which
`init_loss_fn` returns once per (model, batch-norm or not), and the trainer caches its steps
on (model, config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nio_jax import data, files, methods, models
from nio_jax import train as trainmod
from nio_jax.data.loader import Loader
from nio_jax.errors import ConfigError
from nio_jax.experiment_config import (
  absolute_config_spec,
  apply_override,
  build_method_config,
  load_config,
  parse_override,
  search_batches,
  switch_method,
  validate_config,
)
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.results import InitResult
from nio_jax.scales import scales_to_dict
from nio_jax.train.metrics import gc_fn_of, gc_records, logged_recipe, measure_gc, read_metrics


@dataclasses.dataclass
class Run:
  """What `build` returns: the config and the objects it describes.

  Attributes:
    cfg: the validated experiment config.
    model: the linen model.
    variables: the model's own initial variables (before any method).
    train_loader: the training loader.
    test_set: the test data.
    image_shape: the shape of one input image.
    method_config: the configured method's config (`experiment_config.build_method_config`).
  """

  cfg: Any
  model: Any
  variables: dict
  train_loader: Any
  test_set: Any
  image_shape: tuple
  method_config: Any


_INIT_FNS: dict = {}


def build(cfg, method_config=None) -> Run:
  """Loaders, model, its initial variables and the method config of a validated config.

  `method_config`: the method config `load_config` / `validate_config` built for `cfg`;
  None builds it here (`build_method_config`)."""
  mcfg = build_method_config(cfg) if method_config is None else method_config
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
  except (FileNotFoundError, ImportError, RuntimeError, OSError) as e:
    raise ConfigError(missing_data_message(cfg, e)) from None
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
  return Run(cfg, model, dict(variables), loader, test_set, shape, mcfg)


def missing_data_message(cfg, error: BaseException) -> str:
  """What `nio-jax` says when the dataset of `cfg` cannot be loaded: where the files were
  looked for, where to put them (`$NIO_JAX_DATA` or `data.data_dir`), and the TFDS
  fallback's own error in one line."""
  d = cfg.data
  file_error = error if isinstance(error, FileNotFoundError) else None
  if file_error is None and d.source != "tfds" and d.dataset != "imagenet2012":
    try:  # the file loader's message says where it looked (cheap: it fails before reading)
      data.load_dataset(d.dataset, "train", data_dir=d.data_dir, source="files")
    except FileNotFoundError as e:
      file_error = e
    except Exception:  # noqa: BLE001 - only the message is wanted
      pass
  where = {
    "fashion_mnist": "the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; "
    "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
    "/usr/share/datasets/fashion-mnist)",
    "cifar10": "the extracted CIFAR-10 python archive (cifar-10-batches-py/)",
    "cifar100": "the extracted CIFAR-100 python archive (cifar-100-python/)",
    "imagenet2012": "the prepared TFDS imagenet2012 dataset (tfds build imagenet2012)",
  }.get(d.dataset, "its files")
  parts = [f"dataset {d.dataset!r} not found."]
  if file_error is not None:
    parts.append(str(file_error).strip().splitlines()[0])
  parts.append(
    f"Put {where} in a directory DIR and point NIO_JAX_DATA=DIR at it, or pass "
    f"--set data.data_dir=DIR (data.data_dir={d.data_dir!r} now)."
  )
  if not isinstance(error, FileNotFoundError):
    text = " ".join(str(error).split())
    parts.append(f"TFDS fallback: {type(error).__name__}: {text[:300]}")
  return " ".join(parts)


_LOSS_FNS: dict = {}


def init_loss_fn(run: Run, variables: dict | None = None):
  """`(loss_fn, params)` of `variables` (default: the run's initial ones) for the methods.

  `loss_fn(params, batch) -> [B]` per-example losses applies the model in training mode.
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
  """`num` training batches of `init.batch_size` from loader stream `stream`.

  Stream 0 is the training order, 1 the method's, 2 the GC report's.
  """
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


def init_data(run: Run):
  """What the method consumes: `search_batches` real batches of `init.batch_size`, or the
  shape spec for Gaussian inputs (`init.data="random"`, for a method whose `Method.data`
  takes it)."""
  cfg = run.cfg
  if cfg.init.data == "random":
    bs = int(cfg.init.batch_size or cfg.data.batch_size)
    return {
      "image": (bs,) + tuple(run.image_shape),
      "num_classes": data.NUM_CLASSES[cfg.data.dataset],
    }
  return init_batches(run, search_batches(cfg, run.method_config), stream=1)


def measure_params(
  run: Run, loss_fn, params, *, progress: bool = False, batches: list | None = None
) -> dict | None:
  """The GC report: GC / gradient norm of `params` over `init.measure_batches` batches.

  The batches are those of loader stream 2 (the same for every call; `batches`: those
  batches, drawn once by the caller), with the config's `measure_chunks` /
  `measure_overlap`. None when `init.measure_batches` is 0; `{"error": ...}` when the
  measurement fails (e.g. a zero gradient).
  """
  k = int(run.cfg.init.measure_batches)
  if k == 0:
    return None
  if batches is None:
    batches = list(init_batches(run, k, stream=2))
  return measure_gc(loss_fn, params, batches[:k], show_progress=progress, **_measure_setting(run))


def _measure_setting(run: Run) -> dict:
  """The GC report's sub-batch setting (D, r): `init.measure_chunks` / `measure_overlap`."""
  return dict(num_chunks=run.cfg.init.measure_chunks, overlap=float(run.cfg.init.measure_overlap))


def gc_tracker(run: Run):
  """`gc_fn(variables)` for `train.gc_every`: the GC report (`measure_params`'s measurement,
  `train.metrics.gc_fn_of` as in the trainer's `default_gc_fn`, on batches of stream 2 drawn
  once here, with the config's sub-batch setting) at the params of a training step.

  The loss is `init_loss_fn`'s of the run's initial variables: for batch-norm models it
  normalises each batch by its own statistics (training mode), so the running statistics
  of the step do not enter, the result equals a measurement with that checkpoint's
  `batch_stats` (`nio-jax measure --checkpoint`), and the compiled measurement is reused
  for every step (and every run of the same model).
  """
  loss_fn, _ = init_loss_fn(run)
  batches = init_batches(run, int(run.cfg.init.measure_batches), stream=2)
  return gc_fn_of(loss_fn, batches, **_measure_setting(run))


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Initialised:
  """What `initialise` returns.

  Attributes:
    result: the method's `InitResult`.
    variables: the run's initial variables with the method's params.
    seconds: wall time of the method (compilation included).
    num_batches: batches handed to the method (0 for a shape spec or none).
    before: the GC report of the model's own init (None when off).
    after: the GC report of the initialised params (None when off).
    measure_seconds: wall time of the two GC reports.
    params_path: where the initialised variables were saved.
  """

  result: InitResult
  variables: dict
  seconds: float
  num_batches: int
  before: dict | None
  after: dict | None
  measure_seconds: float
  params_path: pathlib.Path


def initialise(run: Run, workdir, *, progress: bool = False) -> Initialised:
  """Runs the configured method once, between two GC reports, and saves its files.

  Writes `init_params.msgpack` (the initialised variables), `init_history.json` (the
  method's history, its config and its time), `scales.json` (learned scales, if any) and
  `init_report.json` (the GC report before and after) into `workdir`.
  """
  workdir = pathlib.Path(workdir)
  loss_fn, params = init_loss_fn(run)
  t = time.perf_counter()
  before = measure_params(run, loss_fn, params, progress=progress)
  measure_seconds = time.perf_counter() - t
  batches = init_data(run)
  t = time.perf_counter()
  # Several processes (jax.distributed): the search is data parallel over all their devices,
  # each process computing its rows of every batch.
  mesh = None
  if jax.process_count() > 1:
    from nio_jax import distributed  # noqa: PLC0415

    mesh = distributed.make_mesh()
  result = methods.initialize(
    run.cfg.init.method, loss_fn, params, batches, run.method_config, progress=progress, mesh=mesh
  )
  jax.block_until_ready(result.params)
  seconds = time.perf_counter() - t
  unchanged = all(
    a is b for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(params), strict=True)
  )
  t = time.perf_counter()
  after = before if unchanged else measure_params(run, loss_fn, result.params, progress=progress)
  measure_seconds += time.perf_counter() - t
  out = Initialised(
    result=result,
    variables={**run.variables, "params": result.params},
    seconds=seconds,
    num_batches=0 if isinstance(batches, dict) else len(batches),
    before=before,
    after=after,
    measure_seconds=measure_seconds,
    params_path=workdir / "init_params.msgpack",
  )
  files.save_variables(out.params_path, out.variables)
  _save_init_files(workdir, run, out)
  return out


def _save_init_files(workdir: pathlib.Path, run: Run, init: Initialised) -> None:
  """`init_history.json`, `scales.json` and `init_report.json` of an initialisation."""
  r = init.result
  files.write_json(
    workdir / "init_history.json",
    {
      "seconds": init.seconds,
      "method": r.method,
      "num_batches": init.num_batches,
      "history": r.history,
      "config": r.config,
    },
  )
  if r.scales is not None:
    files.write_json(workdir / "scales.json", scales_to_dict(r.scales))
  files.write_json(
    workdir / "init_report.json",
    {
      "method": run.cfg.init.method,
      "seconds": init.seconds,
      "before": init.before,
      "after": init.after,
      "model": run.cfg.model.name,
      "dataset": run.cfg.data.dataset,
    },
  )


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The workdir: one config per run directory
# --------------------------------------------------------------------------------------------

# The resolved config of the run a workdir holds (`resolved_config`), written by every run.
CONFIG_FILE = "config.json"

# Config keys that do not change a run's results, left out when a rerun's config is compared
# with the one that made the run in that workdir (`check_workdir`).
RESULT_NEUTRAL_KEYS = (
  "workdir",  # where the run lives
  "max_steps",  # where training stops: a larger value continues the same run
  "data.prefetch",  # how many batches are prepared ahead
  "train.progress",  # progress bars
  "train.plots",  # whether curves.png is drawn
  "train.checkpoint_every_steps",  # how often checkpoints are written (not what they hold)
  "train.max_to_keep",  # how many checkpoints are kept
)


def resolved_config(cfg, method_config=None) -> dict:
  """The config as JSON values with `init.config` resolved: the method config that runs
  (`method_config`, else `build_method_config`: the method's defaults filled in, a GradInit
  `init.recipe` merged), so that a key set to its default compares equal to the key left
  unset."""
  out = json.loads(cfg.to_json_best_effort())
  mcfg = build_method_config(cfg) if method_config is None else method_config
  resolved = mcfg.to_dict() if hasattr(mcfg, "to_dict") else (mcfg or {})
  out["init"]["config"] = files.to_jsonable(resolved)
  return out


def _flat(d: Any, prefix: str = "") -> dict:
  if not isinstance(d, dict) or not d:
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """`["key: old -> new", ...]` for every key whose value differs between two resolved
  configs, except `RESULT_NEUTRAL_KEYS` (and the keys under them)."""
  a, b = _flat(old), _flat(new)
  neutral = lambda k: any(k == n or k.startswith(n + ".") for n in RESULT_NEUTRAL_KEYS)  # noqa: E731
  unset = "(unset)"
  return [
    f"{k}: {a.get(k, unset)!r} -> {b.get(k, unset)!r}"
    for k in sorted(set(a) | set(b))
    if not neutral(k) and a.get(k, unset) != b.get(k, unset)
  ]


def check_workdir(cfg, workdir, *, overwrite: bool = False, method_config=None) -> str | None:
  """Makes `workdir` the home of `cfg`'s run, or refuses: the one rule for reruns.

  A workdir that holds a run (`files.holds_run`) of the same resolved config (`resolved_config`,
  compared without `RESULT_NEUTRAL_KEYS`) is continued: `train_run` resumes from its last
  checkpoint and does not search again. A run of another config (or one whose config is
  unknown) is refused with a `ConfigError` naming the ways on, unless `overwrite`, which
  deletes that run's files (`files.clear_run`) first. Then writes `config.json` (the
  resolved config). `method_config`: `cfg`'s built method config (`load_config`), else built
  here.

  Returns:
    A line saying how the run starts when it is not a fresh start (e.g. "resuming from step
    120, search skipped"), else None.

  Raises:
    ConfigError: the workdir holds a run of another config and `overwrite` is False.
  """
  workdir = pathlib.Path(workdir)
  new = resolved_config(cfg, method_config)
  note = None
  if overwrite and files.holds_run(workdir):
    removed = files.clear_run(workdir)
    note = f"--overwrite: deleted the earlier run's files in {workdir} ({len(removed)} entries)"
  elif files.holds_run(workdir):
    old = files.read_json(workdir / CONFIG_FILE)
    changes = ["no config.json to compare with"] if old is None else config_changes(old, new)
    if changes:
      shown = "; ".join(changes[:6]) + (f"; ... ({len(changes)} keys)" if len(changes) > 6 else "")
      raise ConfigError(
        f"workdir {workdir} holds a run of another config ({shown}); continuing it would mix "
        "two configs' results. Either pass --overwrite (deletes that run's files in the "
        f"workdir, then starts afresh) or give another --workdir; to continue that run, rerun "
        f"it with its own config (see {workdir / 'run.json'}). In Python: "
        "experiment.train_run(cfg, workdir, overwrite=True)."
      )
    steps = files.checkpoint_steps(workdir / "checkpoints")
    if steps:
      done = " (the run finished: nothing left to train)" if is_finished(workdir) else ""
      note = f"resuming from step {max(steps)}, search skipped{done}"
    else:
      note = "same config, no checkpoint yet: the search runs again"
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_json(workdir / CONFIG_FILE, new)
  return note


# How a run was launched (`start_run`): the config spec and overrides `measure` reloads.
RUN_FILE = "run.json"


def default_workdir(cfg, workdir=None) -> pathlib.Path:
  """The run's directory: `workdir`, else the config's `workdir`, else `runs/<name>`."""
  return pathlib.Path(workdir or cfg.get("workdir") or os.path.join("runs", cfg.name))


def start_run(
  cfg,
  workdir,
  *,
  command: str,
  config_spec: str,
  overrides: Sequence[str] = (),
  overwrite: bool = False,
  argv: Sequence[str] | None = None,
  method_config=None,
) -> str | None:
  """Makes `workdir` the home of a run launched by `command` ("init", "train", "compare"):
  `check_workdir` (refuses a run of another config unless `overwrite`; writes `config.json`),
  then `run.json` (the command, the config spec with an absolute path, the overrides, the
  name and `argv`), which `load_run_config` reads back. `method_config`: `cfg`'s built method
  config (`load_config`), else built here.

  Returns:
    `check_workdir`'s line on how the run starts (None for a fresh start); for "init", which
    always searches, a resume says so.
  """
  workdir = pathlib.Path(workdir)
  note = check_workdir(cfg, workdir, overwrite=overwrite, method_config=method_config)
  if note and command == "init" and note.startswith("resuming"):
    note = "same config as the run in this workdir: the search runs again (init always searches)"
  files.write_json(
    workdir / RUN_FILE,
    {
      "command": command,
      "config": absolute_config_spec(config_spec),
      "overrides": list(overrides),
      "name": cfg.name,
      "argv": list(sys.argv if argv is None else argv),
    },
  )
  return note


def load_run_config(rundir, overrides: Sequence[str] = ()):
  """The config of the run in `rundir`, reloaded from its `run.json` (the config spec and
  overrides it was launched with), with `overrides` applied after them.

  Returns:
    `(cfg, method config)`, as `load_config` returns them.

  Raises:
    ConfigError: `rundir` is not a directory or holds no `run.json`.
  """
  rundir = pathlib.Path(rundir)
  if not rundir.is_dir():
    raise ConfigError(f"run directory not found: {rundir}")
  info = files.read_json(rundir / RUN_FILE)
  if info is None:
    raise ConfigError(
      f"measure needs a run directory written by nio-jax init/train (with run.json), or "
      f"--config: {rundir} has no run.json"
    )
  return load_config(info["config"], list(info.get("overrides", [])) + list(overrides))


def measure_run(
  cfg,
  rundir=None,
  *,
  params: Sequence = (),
  checkpoints: Sequence = (),
  fresh: bool = False,
  num_batches: int | None = None,
  progress: bool = False,
  method_config=None,
) -> dict:
  """`nio-jax measure`: the GC report (`measure_params`) of saved variables.

  Measures each of `params` (msgpack files), each checkpoint step of `checkpoints` (in
  `<rundir>/checkpoints`) and, with `fresh`, the model's own init; with none of these, the
  run's `init_params.msgpack` and `final_params.msgpack`. `num_batches` replaces
  `init.measure_batches` (a config without a GC report measures 5 batches).
  `method_config`: `cfg`'s built method config (`load_config`), else built here.

  Returns:
    `{name: GC report}` in the order measured.

  Raises:
    ConfigError: a checkpoint without `rundir`, or nothing to measure.
  """
  rundir = None if rundir is None else pathlib.Path(rundir)
  if rundir is not None and not rundir.is_dir():
    raise ConfigError(f"run directory not found: {rundir}")
  if num_batches is not None:
    cfg.init.measure_batches = int(num_batches)
  if int(cfg.init.measure_batches) < 1:
    cfg.init.measure_batches = 5
  run = build(cfg, method_config)
  sources: list[tuple[str, Any]] = [(str(p), p) for p in map(pathlib.Path, params)]
  for step in checkpoints:
    if rundir is None:
      raise ConfigError("--checkpoint needs the run directory")
    sources.append((f"checkpoint {step}", ("ckpt", step)))
  if not sources and rundir is not None:
    sources = [
      (str(p), p)
      for p in (rundir / "init_params.msgpack", rundir / "final_params.msgpack")
      if p.exists()
    ]
  if not sources and not fresh:
    raise ConfigError(
      f"no saved params in {rundir} (init_params.msgpack / final_params.msgpack); "
      "pass --params FILE or --checkpoint STEP"
    )
  out = {}
  if fresh:
    loss_fn, p0 = init_loss_fn(run)
    out["fresh (model init)"] = measure_params(run, loss_fn, p0, progress=progress)
  for name, src in sources:
    if isinstance(src, tuple):
      v = files.load_checkpoint_variables(rundir / "checkpoints", src[1], run.variables)
    else:
      v = files.load_variables(src, run.variables)
    loss_fn, p = init_loss_fn(run, v)
    out[name] = measure_params(run, loss_fn, p, progress=progress)
  return out


def init_run(
  cfg, workdir, *, progress: bool = False, overwrite: bool = False, method_config=None
) -> Initialised:
  """`nio-jax init`: the configured method alone (`initialise` on a fresh build), in a workdir
  that holds no run of another config (`check_workdir`). `method_config`: `cfg`'s built
  method config (`load_config`), else built here."""
  workdir = pathlib.Path(workdir)
  check_workdir(cfg, workdir, overwrite=overwrite, method_config=method_config)
  return initialise(build(cfg, method_config), workdir, progress=progress)


def is_finished(workdir) -> bool:
  """True when `workdir` holds the record of a finished (or diverged) `train_run`."""
  return bool((files.read_json(pathlib.Path(workdir) / files.RUN_RECORD) or {}).get("finished"))


def train_run(
  cfg, workdir, *, progress: bool | None = None, overwrite: bool = False, method_config=None
) -> dict:
  """Init + training + evaluations of one config; resumes from the trainer's checkpoints.

  The workdir must hold no run of another config (`check_workdir`; `overwrite` deletes such
  a run's files first). The order is the module's: build, then resume (a checkpoint
  exists: no search) or
  initialise (`initialise`: the method between two GC reports), then train from the
  initialised variables, then record. The test accuracy is measured after each
  `eval.steps` step (first `eval.subset` test images), at each epoch end and, when
  `max_steps` ends the run inside an epoch, at that step (whole test set). A diverged run
  is a result: its record says so in `status`. `method_config`: `cfg`'s built method config
  (`load_config` returns it), else built here.

  Returns:
    The run's record, also written to `<workdir>/run_record.json` (`run_record`).
  """
  workdir = pathlib.Path(workdir)
  if progress is not None:
    cfg.train.progress = bool(progress)
  check_workdir(cfg, workdir, overwrite=overwrite, method_config=method_config)
  run = build(cfg, method_config)
  # Resume is decided here, once: the trainer restores this step, and nothing is searched.
  resume_step = max(files.checkpoint_steps(workdir / "checkpoints"), default=None)
  init = None
  if resume_step is None:
    init = initialise(run, workdir, progress=bool(cfg.train.progress))
  max_steps = cfg.get("max_steps")
  try:
    res = trainmod.train(
      run.model,
      run.variables if init is None else init.variables,
      run.train_loader,
      run.test_set,
      cfg.train,
      workdir,
      stop_after_step=None if max_steps is None else int(max_steps),
      eval_at=_eval_at(run),
      gc_fn=gc_tracker(run) if cfg.train.get("gc_every") else None,
      resume_step=resume_step,
    )
    status = "finished"
  except trainmod.NonFiniteLossError as e:  # divergence is a result, not a crash
    res, status = None, f"diverged at step {e.step}"
  record = run_record(run, workdir, res, status, init, start_step=resume_step or 0)
  if res is not None:
    files.save_variables(workdir / "final_params.msgpack", res.variables)
  files.write_json(workdir / files.RUN_RECORD, record)
  return record


def _eval_at(run: Run) -> dict:
  """`{step: test data}` of the trainer's extra evaluations: `eval.steps` on the first
  `eval.subset` test images, and a `max_steps` inside an epoch on the whole test set (or on
  the subset, `eval.last_on_full_test=False`)."""
  cfg = run.cfg
  eval_test = run.test_set
  if cfg.eval.subset is not None:
    eval_test = run.test_set.subset(int(cfg.eval.subset))
  eval_at = {int(k): eval_test for k in cfg.eval.steps}
  max_steps = cfg.get("max_steps")
  if max_steps is not None and int(max_steps) % run.train_loader.steps_per_epoch:
    full = cfg.eval.get("last_on_full_test", True)
    eval_at[int(max_steps)] = run.test_set if full else eval_test
  return eval_at


def untrained_fields() -> dict:
  """The training fields of a run record that did not train (diverged before any
  accuracy): no step, no accuracies, no wall times."""
  return {
    "step": None,
    "acc_1": None,
    "acc_1_main": None,
    "acc_best": None,
    "final_test_acc": None,
    "acc_steps": {},
    "acc_epochs": [],
    "train_seconds": None,
    "eval_seconds": None,
    "gc_seconds": None,
  }


def run_record(run: Run, workdir, res, status: str, init: Initialised | None, *, start_step=0):
  """The record of one `train_run` call: `run_record.json`.

  Args:
    run: the run.
    workdir: its directory (the metrics log and the previous record are read there).
    res: the trainer's `TrainResult`, None when the run diverged.
    status: "finished" or "diverged at step N".
    init: this call's initialisation, None on resume (its fields are then kept from the
      previous record).
    start_step: the step this call started from.

  Returns:
    `name`, `model`, `method`, `seed`, `status`, `finished`, `step`, `steps_per_epoch`,
    the accuracies (`acc_1`, `acc_1_main`, `acc_best`, `final_test_acc`, `acc_steps`
    `{step: acc}`, `acc_epochs`), the GC report (`before`, `after`), the search
    (`search_steps`, `search_seconds`, `scales`), the wall times (`measure_seconds`,
    `train_seconds`, `eval_seconds`, `step_seconds`: training seconds per step in this
    call, `search_rel_step`), `gc_steps` / `gc_seconds` (`train.gc_every`), `resumed` and
    the optimiser `recipe` that ran.
  """
  cfg, workdir = run.cfg, pathlib.Path(workdir)
  spe = run.train_loader.steps_per_epoch
  max_steps = None if cfg.get("max_steps") is None else int(cfg.max_steps)
  prev = files.read_json(workdir / files.RUN_RECORD) or {}
  if init is not None:
    searched = {
      "before": init.before,
      "after": init.after,
      "search_steps": init.result.num_steps,
      "search_seconds": init.seconds,
      "measure_seconds": init.measure_seconds,
      "scales": None if init.result.scales is None else scales_to_dict(init.result.scales),
    }
  else:
    keys = ("before", "after", "search_steps", "search_seconds", "scales")
    searched = {**{k: prev.get(k) for k in keys}, "measure_seconds": 0.0}
  trained = untrained_fields()
  if res is not None:
    final = res.final_test_acc
    if max_steps is not None and max_steps in res.step_evals and max_steps % spe:
      final = res.step_evals[max_steps]
    trained = {
      "step": res.step,
      "acc_1": res.acc_1,
      "acc_1_main": res.acc_1_main,
      "acc_best": res.acc_best,
      "final_test_acc": final,
      "acc_steps": {str(k): v for k, v in res.step_evals.items()},
      "acc_epochs": [e["test_acc"] for e in res.evals],
      "train_seconds": res.train_seconds,
      "eval_seconds": res.eval_seconds,
      "gc_seconds": res.gc_seconds,
      "step_seconds": res.train_seconds / max(res.step - start_step, 1),
    }
  metrics = workdir / "metrics.jsonl"
  record = {
    "name": cfg.name,
    "model": cfg.model.name,
    "method": cfg.init.method,
    "seed": int(cfg.seed),
    "status": status,
    "finished": (res is None or res.finished or (max_steps is not None and res.step >= max_steps)),
    "steps_per_epoch": spe,
    **trained,
    **searched,
    # `train.gc_every`: {step: GC report (+ its seconds)} over the whole run, from the log
    # (also for a diverged run).
    "gc_steps": {str(k): v for k, v in gc_records(read_metrics(metrics)).items()},
    "resumed": init is None,
    # The optimiser recipe that ran (no-norm or with normalisation), from the trainer's log.
    "recipe": logged_recipe(metrics),
  }
  searches = methods.get_method(cfg.init.method).searches
  if searches and record["search_seconds"] and record.get("step_seconds"):
    record["search_rel_step"] = record["search_seconds"] / record["step_seconds"]
  if record["scales"] is None:
    del record["scales"]
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
  """A copy of `cfg` that runs `method`: `init.method` (a method other than the config's own
  drops the config's `init.config` settings, `experiment_config.switch_method`), then
  `compare.overrides.<method>` (`key=value` strings), name `<name>_<method>`; validated."""
  c = cfg.copy_and_resolve_references()
  c.init.method = method
  if method != cfg.init.method:
    # The base config's init.config (recipe, data kind) belong to its own method: another
    # method starts from its defaults, then takes its compare.overrides.
    switch_method(c)
  c.name = f"{cfg.name}_{method}"
  c.workdir = None
  overrides = c.compare.overrides.get(method, ()) if "compare" in c else ()
  if isinstance(overrides, str):
    overrides = (overrides,)
  for item in overrides:
    apply_override(c, *parse_override(item))
  validate_config(c)
  return c


def compare_run(
  cfg, workdir, *, methods_=None, progress: bool | None = None, overwrite: bool = False
) -> dict:
  """Runs `train_run` for each method of `compare_methods` on the same config.

  Every method starts from the same seed, hence the same initial params and the same data
  order; each run lives in `<workdir>/<method>` (resumable: a finished run is read back,
  not repeated; a method's folder holding a run of another config is refused, see
  `check_workdir`; `overwrite` deletes the earlier runs first). Compiled steps are shared where the shapes agree: the model's init, the
  GC report and the training step compile once for all methods (they are cached per model
  and training config; see the module docstring).

  Returns:
    `{"methods": [...], "records": {method: run record}, "seconds": {method: wall seconds
    of this call}, "reused": [methods read back], "wall_seconds": total}`.
  """
  workdir = pathlib.Path(workdir)
  names = compare_methods(cfg, methods_)
  configs = {m: method_run_config(cfg, m) for m in names}  # every config checked first
  check_workdir(cfg, workdir, overwrite=overwrite)
  for m in names:  # every method's folder checked before the first one runs
    if progress is not None:
      configs[m].train.progress = bool(progress)
    check_workdir(configs[m], workdir / m, overwrite=overwrite)
  out: dict = {"methods": names, "records": {}, "seconds": {}, "reused": []}
  t_all = time.perf_counter()
  for m in names:
    d = workdir / m
    if is_finished(d):
      out["records"][m] = files.read_json(d / files.RUN_RECORD)
      out["reused"].append(m)
      out["seconds"][m] = 0.0
      continue
    print(f"[nio-jax compare] {m}: {d}", flush=True)
    t = time.perf_counter()
    out["records"][m] = train_run(configs[m], d)
    out["seconds"][m] = time.perf_counter() - t
  out["wall_seconds"] = time.perf_counter() - t_all
  files.write_json(workdir / "compare.json", out)
  return out
