"""`nio-jax`: the command line of nio_jax, driven by `ml_collections` config files.

    nio-jax init    --config configs/fmnist_nio.py [--set key=value ...] [--config.key=value ...]
    nio-jax train   --config configs/cifar10_table.py:resnet110_bn,gradinit
    nio-jax measure runs/fmnist_nio                 # GC / gradient norm of the saved params
    nio-jax report  runs/fmnist_nio runs/fmnist_kaiming --out runs/report
    nio-jax bench   --models resnet20 --batches 32  # nio_jax.bench (needs the torch extra)

A config file defines `get_config()` (or `get_config(arg)`, selected with `path.py:arg`, as
`ml_collections.config_flags` does) returning a ConfigDict built on :func:`base_config`.
Overrides `--set a.b=v` / `--config.a.b=v` parse `v` with `ast.literal_eval` (numbers,
strings, tuples, True/False/None); anything that is not a Python literal stays a plain
string. No override value is ever evaluated as code. The ConfigDict's types are enforced
(a string for an int field is an error), and unknown keys are errors except under the open
dicts `init.config` (method hyper-parameters, checked by the method's config class) and
`model.kwargs` (constructor arguments of the model).

Outputs in the workdir (default `runs/<config.name>`): `init_params.msgpack` (flax msgpack
serialization of the initialised variables, never pickle), `init_history.json`,
`init_report.json` (GC / gradient norm before and after), `scales.json`, `run.json` (how
the run was launched, used by `measure`), `config.json`; `train` adds the trainer's
`metrics.jsonl`, `summary.json`, `curves.png`, `checkpoints/`, `final_params.msgpack` and
`report.md` with its plots.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

# Sub-dicts whose keys are free (checked later by the method config class / the model).
OPEN_DICTS = ("init.config", "model.kwargs")
INIT_DATA = ("real", "random")


class CLIError(Exception):
  """A user error: printed as `nio-jax: error: ...`, exit status 2."""


# --------------------------------------------------------------------------------------------
# The config schema
# --------------------------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
  """The schema every config file fills in (defaults: Fashion-MNIST, cnn_small, NIO).

  Fields:
    name: run name; the default workdir is `runs/<name>`.
    workdir: output directory (None = `runs/<name>`).
    seed: seed of the model init and the data order.
    model.name / model.kwargs: `nio_jax.models.get(name, **kwargs)`; `num_classes` is
      taken from the dataset unless given.
    data: `nio_jax.data.make_loaders` arguments (`dataset`, `batch_size`, `train_subset`,
      `test_subset`, `data_dir`, `source`, `pad_to_32`, `augment`, `prefetch`).
    init.method: a registered method (`nio_jax.methods.available_methods()`).
    init.recipe: GradInit recipe name (`GRADINIT_RECIPES`), merged under `init.config`.
    init.config: the method's hyper-parameters (None/empty = the method's defaults).
    init.batch_size: batch size of the init batches (None = data.batch_size).
    init.num_batches: batches drawn for the method (None = steps x batches per step).
    init.data: "real" (training batches) or "random" (MetaInit's Gaussian inputs).
    init.measure_batches: batches of the GC / gradient-norm report (0 = no report);
      init.measure_chunks / init.measure_overlap: its sub-batch setting (D, r).
    train: `nio_jax.train.default_config()` (the published CIFAR recipe);
      `train.batch_size` follows `data.batch_size`.
    published: the paper's numbers for this experiment (Acc_1 / Acc_best in %, source).
  """
  from nio_jax.train.config import default_config  # noqa: PLC0415

  c = ml_collections.ConfigDict()
  c.name = "run"
  c.workdir = config_dict.placeholder(str)
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn_small"
  c.model.kwargs = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "fashion_mnist"
  c.data.batch_size = 128
  c.data.train_subset = config_dict.placeholder(int)
  c.data.test_subset = config_dict.placeholder(int)
  c.data.data_dir = config_dict.placeholder(str)
  c.data.source = "auto"
  c.data.pad_to_32 = False
  c.data.augment = config_dict.placeholder(bool)
  c.data.prefetch = 2

  c.init = ml_collections.ConfigDict()
  c.init.method = "nio"
  c.init.recipe = config_dict.placeholder(str)
  c.init.config = ml_collections.ConfigDict()
  c.init.batch_size = config_dict.placeholder(int)
  c.init.num_batches = config_dict.placeholder(int)
  c.init.data = "real"
  c.init.measure_batches = 5
  c.init.measure_chunks = 4
  c.init.measure_overlap = 0.2

  c.train = default_config()
  c.train.batch_size = c.data.get_ref("batch_size")

  c.published = ml_collections.ConfigDict()
  c.published.acc_1 = config_dict.placeholder(float)
  c.published.acc_best = config_dict.placeholder(float)
  c.published.source = ""
  return c


# --------------------------------------------------------------------------------------------
# Loading configs and overrides
# --------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
  """An override value: a Python literal via `ast.literal_eval`, else the string itself.

  `true`/`false`/`none`/`null` (any case) are accepted too. Never evaluates code.
  """
  if not isinstance(text, str):
    raise TypeError(f"override value must be a string, got {type(text).__name__}")
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text


def parse_override(item: str) -> tuple[str, Any]:
  """`"a.b=v"` -> `("a.b", parse_value(v))`."""
  if "=" not in item:
    raise CLIError(f"override {item!r} must look like key=value (e.g. train.num_epochs=2)")
  key, _, value = item.partition("=")
  key = key.strip()
  if key.startswith("config."):
    key = key[len("config.") :]
  if not key or any(not part.isidentifier() for part in key.split(".")):
    raise CLIError(f"bad override key {key!r}: use dotted identifiers such as data.batch_size")
  return key, parse_value(value)


def _known(d) -> str:
  return ", ".join(sorted(d.keys())) or "(none)"


def apply_override(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets `cfg.<key> = value` with ConfigDict type checking; unknown keys are errors outside
  `OPEN_DICTS`."""
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts[:-1]):
    if part not in node:
      raise CLIError(
        f"unknown config key {'.'.join(parts[: i + 1])!r}; known under "
        f"{'.'.join(parts[:i]) or 'the root'}: {_known(node)}"
      )
    node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise CLIError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a group")
  parent, last = ".".join(parts[:-1]), parts[-1]
  if last not in node and parent not in OPEN_DICTS:
    raise CLIError(
      f"unknown config key {key!r}; known under {parent or 'the root'}: {_known(node)}"
    )
  if isinstance(value, dict):
    value = ml_collections.ConfigDict(value)
  try:
    node[last] = value
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    if parent not in OPEN_DICTS and key not in OPEN_DICTS:
      raise CLIError(f"cannot set {key}={value!r}: {e}") from None
    # Free-form dicts (method hyper-parameters, model kwargs) take any type: replace.
    del node[last]
    node[last] = value


def load_config_file(spec: str) -> tuple[ml_collections.ConfigDict, str, str | None]:
  """`path.py` or `path.py:arg` -> (config, path, arg). The file is Python (like
  ml_collections config files); its `get_config([arg])` builds the config."""
  path, arg = spec, None
  if ":" in spec and not os.path.exists(spec):
    path, _, arg = spec.partition(":")
  p = pathlib.Path(path)
  if not p.is_file():
    raise CLIError(f"config file {path!r} not found")
  name = "nio_jax_config_" + "".join(ch if ch.isalnum() else "_" for ch in p.stem)
  mod_spec = importlib.util.spec_from_file_location(name, p)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise CLIError(f"config file {path!r} has no get_config()")
  try:
    cfg = module.get_config(arg) if arg is not None else module.get_config()
  except (ValueError, KeyError) as e:
    raise CLIError(f"{path}: {e}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise CLIError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return cfg, str(p), arg


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `spec`, applies `key=value` overrides and validates."""
  cfg, _, _ = load_config_file(spec)
  for item in overrides:
    apply_override(cfg, *parse_override(item))
  validate_config(cfg)
  return cfg


def method_config(cfg) -> Any:
  """The method config to pass to `nio_jax.methods.initialize` (validated)."""
  from nio_jax import methods  # noqa: PLC0415

  try:
    m = methods.get_method(cfg.init.method)
  except ValueError as e:
    raise CLIError(str(e)) from None
  values = cfg.init.config.to_dict()
  recipe = cfg.init.get("recipe")
  try:
    if recipe is not None:
      if m.name not in ("gradinit", "gradinit_adam"):
        raise CLIError(f"init.recipe={recipe!r} is a GradInit recipe; method is {m.name!r}")
      if recipe not in methods.GRADINIT_RECIPES:
        raise CLIError(
          f"unknown GradInit recipe {recipe!r}; known: "
          f"{', '.join(sorted(methods.GRADINIT_RECIPES))}"
        )
      values = {**methods.GRADINIT_RECIPES[recipe], **values}
    if m.name == "gradinit_adam":
      from nio_jax.methods.gradinit import ADAM_DEFAULTS  # noqa: PLC0415

      methods.GradInitConfig.create({**ADAM_DEFAULTS, **values})
      return values
    if m.config_cls is not None and hasattr(m.config_cls, "create"):
      return m.config_cls.create(values)
    if m.name == "fixup":
      allowed = {"num_branches", "layers_per_branch", "force"}  # nio_jax.methods.fixup
      unknown = sorted(set(values) - allowed)
      if unknown:
        raise ValueError(f"unknown Fixup config key(s) {unknown}; known: {sorted(allowed)}")
  except (ValueError, TypeError) as e:
    raise CLIError(f"init.config for method {m.name!r}: {e}") from None
  return values or None


def validate_config(cfg) -> None:
  """Raises CLIError (with the known names) for an unknown model, dataset or method, or a bad
  value; the method config and the training config are validated by their own classes."""
  from nio_jax import data, models  # noqa: PLC0415
  from nio_jax.train.config import validate as validate_train  # noqa: PLC0415

  for group in ("model", "data", "init", "train"):
    if group not in cfg:
      raise CLIError(f"config has no {group!r} group; build it on nio_jax.cli.base_config()")
  if cfg.model.name not in models.names():
    raise CLIError(f"unknown model {cfg.model.name!r}; known models: {', '.join(models.names())}")
  if cfg.data.dataset not in data.DATASETS:
    raise CLIError(
      f"unknown dataset {cfg.data.dataset!r}; known datasets: {', '.join(data.DATASETS)}"
    )
  if cfg.init.data not in INIT_DATA:
    raise CLIError(f"init.data must be one of {INIT_DATA}, got {cfg.init.data!r}")
  if cfg.init.data == "random" and cfg.init.method != "metainit":
    raise CLIError("init.data='random' (Gaussian inputs) is for method 'metainit' only")
  for k in ("batch_size",):
    if int(cfg.data[k]) < 1:
      raise CLIError(f"data.{k} must be >= 1")
  if int(cfg.init.measure_batches) < 0:
    raise CLIError("init.measure_batches must be >= 0")
  method_config(cfg)
  try:
    validate_train(cfg.train)
  except ValueError as e:
    raise CLIError(f"train: {e}") from None


# --------------------------------------------------------------------------------------------
# Building a run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  cfg: Any
  model: Any
  variables: dict
  train_loader: Any
  test_set: Any
  image_shape: tuple


def build(cfg) -> Run:
  """Loaders, model and its initial variables from a validated config."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from nio_jax import data, models  # noqa: PLC0415

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
    raise CLIError(f"dataset {d.dataset!r} not available: {msg}") from None
  kwargs = cfg.model.kwargs.to_dict()
  kwargs.setdefault("num_classes", data.NUM_CLASSES[d.dataset])
  try:
    model = models.get(cfg.model.name, **kwargs)
  except TypeError as e:
    raise CLIError(f"model {cfg.model.name!r}: bad model.kwargs {kwargs}: {e}") from None
  shape = tuple(getattr(loader.source, "image_shape", None) or models.input_shape(cfg.model.name))
  # One jitted init (eager init compiles every initialiser op separately: much slower).
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  variables = init(jax.random.key(int(cfg.seed)), jnp.zeros((1,) + shape, jnp.float32))
  return Run(cfg, model, dict(variables), loader, test_set, shape)


def _steps_per_call(cfg, mcfg) -> tuple[int, int]:
  """(num_steps, batches per step) of the configured method."""
  steps = getattr(mcfg, "num_steps", None)
  if steps is None and isinstance(mcfg, dict):
    steps = mcfg.get("num_steps")
  if cfg.init.method == "gradinit_adam":
    from nio_jax.methods.gradinit import ADAM_DEFAULTS  # noqa: PLC0415

    full = {**ADAM_DEFAULTS, **(mcfg or {})}
    steps = full["num_steps"]
    per = 1 if full.get("lookahead", "half") == "thirds" else 2
    return int(steps), per
  per = int(getattr(mcfg, "batches_per_step", 1) or 1)
  return int(steps or 1), per


def init_data(run: Run, mcfg, stream: int = 1):
  """What the method consumes: a stream of real batches (`init.batch_size`), or MetaInit's
  shape spec for Gaussian inputs."""
  cfg = run.cfg
  if cfg.init.data == "random":
    from nio_jax.data import NUM_CLASSES  # noqa: PLC0415

    bs = int(cfg.init.batch_size or cfg.data.batch_size)
    return {"image": (bs,) + tuple(run.image_shape), "num_classes": NUM_CLASSES[cfg.data.dataset]}
  steps, per = _steps_per_call(cfg, mcfg)
  return init_data_real(run, int(cfg.init.num_batches or steps * per), stream)


def measure_params(run: Run, loss_fn, params, *, progress: bool = False) -> dict | None:
  """GC / gradient norm over `init.measure_batches` training batches of an independent loader
  stream (2; the init method uses 1, training 0): the same batches for every call."""
  import nio_jax  # noqa: PLC0415

  k = int(run.cfg.init.measure_batches)
  if k == 0:
    return None
  batches = list(init_data_real(run, k, stream=2))
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


def init_data_real(run: Run, num: int, stream: int):
  """`num` training batches of `init.batch_size` from loader stream `stream`."""
  from nio_jax.data.loader import Loader  # noqa: PLC0415

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


def run_init(run: Run, loss_fn, params, *, progress: bool = True):
  """Runs the configured method; returns (InitResult, seconds, number of batches)."""
  from nio_jax import methods  # noqa: PLC0415

  mcfg = method_config(run.cfg)
  data = init_data(run, mcfg)
  t0 = time.perf_counter()
  result = methods.initialize(run.cfg.init.method, loss_fn, params, data, mcfg, progress=progress)
  return (
    result,
    time.perf_counter() - t0,
    (len(data) if hasattr(data, "__len__") and not isinstance(data, dict) else 0),
  )


# --------------------------------------------------------------------------------------------
# Saving / loading params
# --------------------------------------------------------------------------------------------


def save_variables(path, variables) -> pathlib.Path:
  """Flax msgpack serialization (no pickle) of a variables dict."""
  import jax  # noqa: PLC0415
  from flax import serialization  # noqa: PLC0415

  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_bytes(serialization.to_bytes(jax.device_get(variables)))
  os.replace(tmp, path)
  return path


def load_variables(path, target):
  """Restores msgpack variables into the structure of `target`, in either block layout
  (scanned or unrolled; shapes are checked)."""
  import jax  # noqa: PLC0415

  from nio_jax.train.checkpoint import load_msgpack_variables  # noqa: PLC0415

  try:
    restored = load_msgpack_variables(path, target)
  except ValueError as e:
    raise CLIError(f"{path}: {e}") from None
  for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(restored)):
    if getattr(a, "shape", None) != getattr(b, "shape", None):
      raise CLIError(
        f"{path}: saved params do not match the model of this config "
        f"(shape {getattr(b, 'shape', None)} vs {getattr(a, 'shape', None)})"
      )
  return restored


def load_checkpoint_variables(ckpt_dir, step: str, target):
  """`{"params", ["batch_stats"]}` of a trainer checkpoint (orbax, `step` or "latest")."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from nio_jax.models import match_layout  # noqa: PLC0415

  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  steps = (
    sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / "state").is_dir())
    if ckpt_dir.is_dir()
    else []
  )
  if not steps:
    raise CLIError(f"no checkpoints in {ckpt_dir}")
  s = steps[-1] if step == "latest" else int(step) if str(step).isdigit() else None
  if s not in steps:
    raise CLIError(f"checkpoint {step!r} not found in {ckpt_dir}; steps: {steps}")
  state = ocp.StandardCheckpointer().restore(ckpt_dir / str(s) / "state")
  v = {k: state[k] for k in ("params", "batch_stats") if k in state}
  want = {k: target[k] for k in v if k in target}
  try:  # saved in the other block layout (scan vs unrolled): convert
    v = match_layout(v, want)
  except ValueError:
    pass
  if jax.tree.structure(want) != jax.tree.structure(v):
    raise CLIError(f"checkpoint {s} in {ckpt_dir} does not match the model of this config")
  return v


def _write_json(path, obj) -> None:
  from nio_jax.train.metrics import to_jsonable  # noqa: PLC0415

  pathlib.Path(path).write_text(json.dumps(to_jsonable(obj), indent=1))


def _workdir(cfg, arg: str | None) -> pathlib.Path:
  w = arg or cfg.get("workdir") or os.path.join("runs", cfg.name)
  p = pathlib.Path(w)
  p.mkdir(parents=True, exist_ok=True)
  return p


def _absolute_spec(spec: str) -> str:
  """`path.py[:arg]` with an absolute path (so `measure` works from any directory)."""
  path, arg = spec, None
  if ":" in spec and not os.path.exists(spec):
    path, _, arg = spec.partition(":")
  path = os.path.abspath(path)
  return path if arg is None else f"{path}:{arg}"


def _save_run_json(workdir, args, cfg, command: str) -> None:
  _write_json(
    workdir / "run.json",
    {
      "command": command,
      "config": _absolute_spec(args.config),
      "overrides": list(args.overrides),
      "name": cfg.name,
      "argv": sys.argv,
    },
  )
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))


def _save_init_outputs(
  workdir, run: Run, result, seconds, num_batches, before, after, write_history: bool = True
) -> None:
  from nio_jax.scales import scales_to_dict  # noqa: PLC0415

  record = {
    "seconds": seconds,
    "method": result.method,
    "num_batches": num_batches,
    "history": result.history,
  }
  if not write_history:  # the trainer wrote it (its seconds, history): add what it lacks
    record = {
      **record,
      **(_read_json(workdir / "init_history.json") or {}),
      "num_batches": num_batches,
    }
  _write_json(workdir / "init_history.json", {**record, "config": result.config})
  if result.scales is not None:
    _write_json(workdir / "scales.json", scales_to_dict(result.scales))
  _write_json(
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


def _fmt(x, spec=".4f") -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return format(x, spec)
  return str(x)


def before_after_table(before, after) -> str:
  rows = ["| | GC (B-GC) | gradient norm | loss |", "|---|---|---|---|"]
  for name, m in (("before", before), ("after", after)):
    if m is None:
      continue
    if "error" in m:
      rows.append(f"| {name} | error: {m['error']} | | |")
      continue
    rows.append(
      f"| {name} | {m['gc']:.4f} ± {m['gc_std']:.4f} | "
      f"{m['grad_norm']:.4f} ± {m['grad_norm_std']:.4f} | {m['loss']:.4f} |"
    )
  return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def _prepare(args):
  cfg = load_config(args.config, args.overrides)
  if getattr(args, "no_progress", False):
    cfg.train.progress = False
  return cfg


def cmd_init(args) -> int:
  from nio_jax.train.trainer import init_loss_fn  # noqa: PLC0415

  cfg = _prepare(args)
  workdir = _workdir(cfg, args.workdir)
  _save_run_json(workdir, args, cfg, "init")
  run = build(cfg)
  progress = not args.no_progress
  loss_fn, params = init_loss_fn(run.model, run.variables, cfg.train.train_kwarg)
  print(
    f"[nio-jax] {cfg.name}: {cfg.model.name} on {cfg.data.dataset}, method "
    f"{cfg.init.method}; workdir {workdir}",
    flush=True,
  )
  before = measure_params(run, loss_fn, params, progress=progress)
  result, seconds, nb = run_init(run, loss_fn, params, progress=progress)
  after = measure_params(run, loss_fn, result.params, progress=progress)
  variables = {**run.variables, "params": result.params}
  path = save_variables(workdir / "init_params.msgpack", variables)
  _save_init_outputs(workdir, run, result, seconds, nb, before, after)
  what = f"{result.num_steps} steps" if result.num_steps else "applied"
  print(
    f"\n{cfg.init.method}: {what} in {seconds:.1f} s (incl. compilation)\n"
    + before_after_table(before, after)
  )
  print(f"\nparams: {path}\nhistory: {workdir / 'init_history.json'}")
  return 0


def cmd_train(args) -> int:
  from nio_jax import train as trainmod  # noqa: PLC0415

  cfg = _prepare(args)
  workdir = _workdir(cfg, args.workdir)
  _save_run_json(workdir, args, cfg, "train")
  run = build(cfg)
  progress = bool(cfg.train.progress)
  loss_fn0, params0 = trainmod.init_loss_fn(run.model, run.variables, cfg.train.train_kwarg)
  resuming = (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir())
  print(
    f"[nio-jax] {cfg.name}: {cfg.model.name} on {cfg.data.dataset}, method "
    f"{cfg.init.method}; workdir {workdir}" + (" (resuming)" if resuming else ""),
    flush=True,
  )
  before = None if resuming else measure_params(run, loss_fn0, params0, progress=progress)
  holder: dict = {}
  mcfg = method_config(cfg)
  steps, per = _steps_per_call(cfg, mcfg)
  if cfg.init.data == "real" and cfg.init.batch_size in (None, cfg.data.batch_size):
    cfg.train.init_num_batches = int(cfg.init.num_batches or steps * per)
  else:
    cfg.train.init_num_batches = 1  # the init_fn draws its own data

  def init_fn(loss_fn, params, batches):
    from nio_jax import methods  # noqa: PLC0415

    own = cfg.init.data == "real" and cfg.init.batch_size in (None, cfg.data.batch_size)
    data = batches if own else init_data(run, mcfg)
    t0 = time.perf_counter()
    res = methods.initialize(cfg.init.method, loss_fn, params, data, mcfg, progress=progress)
    holder.update(
      result=res,
      seconds=time.perf_counter() - t0,
      num_batches=len(data) if not isinstance(data, dict) else 0,
    )
    return res

  try:
    res = trainmod.train(
      run.model, run.variables, run.train_loader, run.test_set, cfg.train, workdir, init_fn=init_fn
    )
  except trainmod.NonFiniteLossError as e:
    raise CLIError(str(e)) from None
  if "result" in holder:
    r = holder["result"]
    after = measure_params(run, loss_fn0, r.params, progress=progress)
    save_variables(workdir / "init_params.msgpack", {**run.variables, "params": r.params})
    _save_init_outputs(
      workdir, run, r, holder["seconds"], holder["num_batches"], before, after, write_history=False
    )
  save_variables(workdir / "final_params.msgpack", res.variables)
  text, plots = report([workdir], workdir)
  print("\n" + text)
  print("plots: " + ", ".join(str(p) for p in plots))
  return 0


def cmd_measure(args) -> int:
  from nio_jax.train.trainer import init_loss_fn  # noqa: PLC0415

  rundir = pathlib.Path(args.run_dir) if args.run_dir else None
  if args.config:
    cfg = load_config(args.config, args.overrides)
  elif rundir is not None and (rundir / "run.json").exists():
    info = json.loads((rundir / "run.json").read_text())
    cfg = load_config(info["config"], list(info.get("overrides", [])) + list(args.overrides))
  else:
    raise CLIError("measure needs a run directory with run.json, or --config")
  if args.batches is not None:
    cfg.init.measure_batches = int(args.batches)
  if int(cfg.init.measure_batches) < 1:
    cfg.init.measure_batches = 5
  run = build(cfg)
  sources: list[tuple[str, Any]] = [(str(p), p) for p in map(pathlib.Path, args.params)]
  for step in args.checkpoint:
    if rundir is None:
      raise CLIError("--checkpoint needs the run directory")
    sources.append((f"checkpoint {step}", ("ckpt", step)))
  if not sources and rundir is not None:
    sources = [
      (str(p), p)
      for p in (rundir / "init_params.msgpack", rundir / "final_params.msgpack")
      if p.exists()
    ]
  if not sources and not args.fresh:
    raise CLIError(
      f"no saved params in {rundir} (init_params.msgpack / final_params.msgpack); "
      "pass --params FILE or --checkpoint STEP"
    )
  out = {}
  base_loss, params0 = init_loss_fn(run.model, run.variables, cfg.train.train_kwarg)

  def loss_for(v):  # without batch_stats one loss_fn serves all params: one compilation
    if not v.get("batch_stats"):
      return base_loss
    return init_loss_fn(run.model, v, cfg.train.train_kwarg)[0]

  if args.fresh:
    out["fresh (model init)"] = measure_params(
      run, base_loss, params0, progress=not args.no_progress
    )
  for name, src in sources:
    if isinstance(src, tuple):
      v = load_checkpoint_variables(rundir / "checkpoints", src[1], run.variables)
    else:
      v = load_variables(src, run.variables)
    out[name] = measure_params(run, loss_for(v), v["params"], progress=not args.no_progress)
  rows = ["| params | GC (B-GC) | gradient norm | loss |", "|---|---|---|---|"]
  for k, m in out.items():
    if "error" in m:
      rows.append(f"| {k} | error: {m['error']} | | |")
    else:
      rows.append(
        f"| {k} | {m['gc']:.4f} ± {m['gc_std']:.4f} | {m['grad_norm']:.4f} ± "
        f"{m['grad_norm_std']:.4f} | {m['loss']:.4f} |"
      )
  print("\n".join(rows))
  if args.json:
    _write_json(args.json, out)
  return 0


def cmd_report(args) -> int:
  dirs = [pathlib.Path(d) for d in args.run_dirs]
  for d in dirs:
    if not d.is_dir():
      raise CLIError(f"run directory {d} not found")
  out = (
    pathlib.Path(args.out)
    if args.out
    else (dirs[0] if len(dirs) == 1 else pathlib.Path("runs/report"))
  )
  text, plots = report(dirs, out)
  print(text)
  print("plots: " + ", ".join(str(p) for p in plots))
  return 0


def cmd_bench(args) -> int:
  from nio_jax.bench import TorchMissingError, engine  # noqa: PLC0415  (only this command)

  try:
    engine.main(list(args.bench_args))
  except TorchMissingError as e:
    print(f"nio-jax bench: {e}", file=sys.stderr)
    return 2
  return 0


# --------------------------------------------------------------------------------------------
# Reports: markdown tables and plots from run directories
# --------------------------------------------------------------------------------------------


def _read_json(path):
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None


def run_summary(d: pathlib.Path) -> dict:
  """What a run directory's logs say (every field may be missing)."""
  from nio_jax.train.metrics import read_metrics  # noqa: PLC0415

  cfg = _read_json(d / "config.json") or {}
  recs = read_metrics(d / "metrics.jsonl")
  evals = [r for r in recs if r.get("type") == "eval"]
  summ = _read_json(d / "summary.json") or {}
  hist = _read_json(d / "init_history.json") or {}
  rep = _read_json(d / "init_report.json") or {}
  times = [r["epoch_time"] for r in evals if r.get("epoch_time") is not None]
  pub = cfg.get("published") or {}
  pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
  return {
    "run": d.name,
    "dir": str(d),
    "model": (cfg.get("model") or {}).get("name", rep.get("model")),
    "dataset": (cfg.get("data") or {}).get("dataset", rep.get("dataset")),
    "method": (cfg.get("init") or {}).get("method", hist.get("method")),
    "baseline": (cfg.get("train") or {}).get("baseline"),
    "init_s": hist.get("seconds", rep.get("seconds")),
    "epoch1_s": times[0] if times else None,
    "epoch_s": (
      sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else (times[0] if times else None)
    ),
    "epochs": len(evals),
    "acc_1": pct(summ.get("acc_1", evals[0]["test_acc"] if evals else None)),
    "acc_best": pct(summ.get("acc_best", max((r["test_acc"] for r in evals), default=None))),
    "final": pct(summ.get("final_test_acc", evals[-1]["test_acc"] if evals else None)),
    "before": rep.get("before"),
    "after": rep.get("after"),
    "pub_acc_1": pub.get("acc_1"),
    "pub_acc_best": pub.get("acc_best"),
    "history": hist.get("history") or {},
    "evals": evals,
    "train": [r for r in recs if r.get("type") == "train"],
    "scales": _read_json(d / "scales.json"),
  }


def _gc(m, key):
  if not m or "error" in m:
    return None
  return m.get(key)


def summary_table(rows: list[dict]) -> str:
  head = (
    "| run | model | data | method | baseline | init (s) | epoch 1 (s) | epoch (s) | "
    "Acc_1 (%) | Acc_best (%) | final (%) | GC before→after | grad norm before→after | "
    "published Acc_1/Acc_best |"
  )
  lines = [head, "|" + "---|" * 14]
  for r in rows:
    gc = f"{_fmt(_gc(r['before'], 'gc'), '.3f')}→{_fmt(_gc(r['after'], 'gc'), '.3f')}"
    gn = f"{_fmt(_gc(r['before'], 'grad_norm'), '.3f')}→{_fmt(_gc(r['after'], 'grad_norm'), '.3f')}"
    pub = (
      f"{_fmt(r['pub_acc_1'], '.1f')}/{_fmt(r['pub_acc_best'], '.1f')}"
      if r["pub_acc_1"] is not None or r["pub_acc_best"] is not None
      else "-"
    )
    lines.append(
      f"| {r['run']} | {_fmt(r['model'])} | {_fmt(r['dataset'])} | {_fmt(r['method'])} | "
      f"{_fmt(r['baseline'])} | {_fmt(r['init_s'], '.1f')} | {_fmt(r['epoch1_s'], '.1f')} | "
      f"{_fmt(r['epoch_s'], '.1f')} | {_fmt(r['acc_1'], '.2f')} | {_fmt(r['acc_best'], '.2f')} | "
      f"{_fmt(r['final'], '.2f')} | {gc} | {gn} | {pub} |"
    )
  return "\n".join(lines)


def _plt():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def plot_training(rows, path) -> pathlib.Path | None:
  rows = [r for r in rows if r["evals"] or r["train"]]
  if not rows:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for r in rows:
    if r["train"]:
      axes[0].plot(
        [t["epoch"] for t in r["train"]], [t["loss"] for t in r["train"]], lw=1, label=r["run"]
      )
    if r["evals"]:
      axes[1].plot(
        [e["epoch"] for e in r["evals"]],
        [100 * e["test_acc"] for e in r["evals"]],
        "o-",
        label=r["run"],
      )
  axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
  axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return pathlib.Path(path)


def plot_search(rows, path) -> pathlib.Path | None:
  import numpy as np  # noqa: PLC0415

  keys = ("gc", "grad_norm", "objective", "gq", "loss")
  rows = [r for r in rows if any(k in r["history"] for k in keys)]
  if not rows:
    return None
  present = [k for k in keys if any(k in r["history"] for r in rows)]
  plt = _plt()
  fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
  for ax, k in zip(axes[0], present):
    for r in rows:
      if k in r["history"]:
        v = np.asarray(r["history"][k], np.float64)
        v = v.reshape(v.shape[0], -1).mean(-1) if v.ndim > 1 else v
        ax.plot(np.arange(len(v)), v, lw=1.2, label=f"{r['run']} ({r['method']})")
    ax.set(
      xlabel="search step",
      title={"gc": "GradCosine", "grad_norm": "gradient norm", "gq": "gradient quotient"}.get(k, k),
    )
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return pathlib.Path(path)


def plot_scales(r, path) -> pathlib.Path | None:
  import numpy as np  # noqa: PLC0415

  sc = r.get("scales")
  if not sc:
    return None
  names, vals = [], []
  for k, v in sc.items():
    a = np.asarray(v, np.float64).ravel()
    if a.size == 1:
      names.append(k), vals.append(float(a[0]))
    else:
      for i, x in enumerate(a):
        names.append(f"{k}[{i}]"), vals.append(float(x))
  plt = _plt()
  fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(vals) + 2), 4.2))
  ax.bar(np.arange(len(vals)), vals)
  ax.axhline(1.0, color="k", lw=0.8, ls="--")
  ax.set_xticks(np.arange(len(vals)))
  ax.set_xticklabels(names, rotation=90, fontsize=6 if len(vals) > 30 else 8)
  ax.set(ylabel="scale", title=f"per-layer scales after the search: {r['run']} ({r['method']})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return pathlib.Path(path)


def report(dirs: Sequence[pathlib.Path], out: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
  """Markdown table + PNGs (training curves, search curves, per-layer scales) for run dirs;
  writes `out/report.md` and returns (markdown, plot paths)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rows = [run_summary(pathlib.Path(d)) for d in dirs]
  plots = []
  p = plot_training(rows, out / "report_training.png")
  plots += [p] if p else []
  p = plot_search(rows, out / "report_search.png")
  plots += [p] if p else []
  for r in rows:
    p = plot_scales(
      r, out / (f"report_scales_{r['run']}.png" if len(rows) > 1 else "report_scales.png")
    )
    plots += [p] if p else []
  for d in dirs:
    c = pathlib.Path(d) / "curves.png"
    if c.exists():
      plots.append(c)
  text = (
    "## Runs\n\n" + summary_table(rows) + "\n\nAcc in %. init (s) = wall time of the "
    "initialisation method including compilation; epoch 1 includes compilation, epoch = "
    "median of the later epochs.\n"
  )
  for r in rows:
    if r["before"] or r["after"]:
      text += (
        f"\n### {r['run']}: before / after {r['method']}\n\n"
        + before_after_table(r["before"], r["after"])
        + "\n"
      )
  text += "\n" + "\n".join(f"![{p.name}]({os.path.relpath(p, out)})" for p in plots) + "\n"
  (out / "report.md").write_text(text)
  return text, plots


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls `--config.k=v`, `--config.k v`, `--set k=v`, `--set=k=v` out of argv."""
  rest, overrides = [], []
  i, argv = 0, list(argv)
  while i < len(argv):
    a = argv[i]
    if a == "--":
      rest += argv[i:]
      break
    if a.startswith("--config."):
      body = a[2:]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise CLIError(f"{a} needs a value")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    elif a in ("--set", "-s"):
      if i + 1 >= len(argv):
        raise CLIError("--set needs key=value")
      overrides.append(argv[i + 1])
      i += 1
    elif a.startswith("--set="):
      overrides.append(a[len("--set=") :])
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="nio-jax",
    description="Learned neural-network initialisation (NIO/GradCosine, "
    "GradInit, MetaInit, Fixup, Kaiming) in JAX/Flax.",
    epilog="Overrides: --set key=value or --config.key=value (values are Python literals "
    "parsed with ast.literal_eval, else strings). See docs/cli.md.",
  )
  sub = p.add_subparsers(dest="command", required=True)

  def common(sp, config_required=True):
    sp.add_argument(
      "--config",
      required=config_required,
      help="config file, optionally with an argument: configs/x.py[:arg]",
    )
    sp.add_argument("--workdir", default=None, help="output directory (default runs/<name>)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")

  sp = sub.add_parser("init", help="run the init method, save params and a GC report")
  common(sp)
  sp.set_defaults(fn=cmd_init)
  sp = sub.add_parser("train", help="init + train, then a small report (table + plots)")
  common(sp)
  sp.set_defaults(fn=cmd_train)
  sp = sub.add_parser("measure", help="GC / gradient norm of saved params")
  sp.add_argument("run_dir", nargs="?", help="run directory (its run.json gives the config)")
  sp.add_argument("--config", default=None, help="config file (instead of run_dir/run.json)")
  sp.add_argument("--params", action="append", default=[], help="msgpack params file(s)")
  sp.add_argument(
    "--batches", type=int, default=None, help="number of batches (default init.measure_batches)"
  )
  sp.add_argument(
    "--checkpoint",
    action="append",
    default=[],
    metavar="STEP",
    help="a trainer checkpoint of run_dir (a step, or 'latest'; step 0 holds "
    "the initialised params)",
  )
  sp.add_argument("--fresh", action="store_true", help="also measure the model's own init")
  sp.add_argument("--json", default=None, help="write the numbers to this JSON file")
  sp.add_argument("--no-progress", action="store_true")
  sp.set_defaults(fn=cmd_measure)
  sp = sub.add_parser("report", help="markdown table + PNG plots from run directories")
  sp.add_argument("run_dirs", nargs="+")
  sp.add_argument(
    "--out", default=None, help="output dir (default: the run dir, or runs/report for several)"
  )
  sp.set_defaults(fn=cmd_report)
  sp = sub.add_parser(
    "bench", help="JAX vs PyTorch benchmark (nio_jax.bench; needs the torch extra)", add_help=False
  )
  sp.add_argument("bench_args", nargs=argparse.REMAINDER)
  sp.set_defaults(fn=cmd_bench)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark script
      return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    rest, overrides = split_overrides(argv)
    args = make_parser().parse_args(rest)
    args.overrides = overrides
    if overrides and args.command in ("report",):
      raise CLIError("report takes no config overrides")
    return int(args.fn(args) or 0)
  except CLIError as e:
    print(f"nio-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
