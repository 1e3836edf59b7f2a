"""Experiment configs: the schema every file in `configs/` builds on, loading a config file,
the `key=value` override parser of the command line, and validation.

`load_config` = file + overrides + `validate_config`, which checks every group once (the
`init` group through the method's config class, `build_method_config`; the `train` group
through `nio_jax.train.validate_train_config`). The training config is
`nio_jax.train.train_config`; what the methods' config classes share is
`nio_jax.method_config`.

A config file defines `get_config()` (or `get_config(arg)`, selected with `path.py:arg`, as
`ml_collections.config_flags` does) returning a ConfigDict built on `base_config`
(usually through a dataset's base file, e.g. `configs/fmnist_base.py`). Overrides
`--set a.b=v` / `--config.a.b=v` parse `v` with `ast.literal_eval` (numbers, strings,
tuples, dicts, True/False/None); anything that is not a Python literal stays a plain string.
No override value is ever evaluated as code. The ConfigDict's types are enforced (a string
for an int field is an error), and unknown keys are errors except under the open dicts
`init.config` (method hyper-parameters, checked by the method's config class) and
`model.kwargs` (constructor arguments of the model).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from nio_jax import data, methods, models
from nio_jax.errors import ConfigError
from nio_jax.train.train_config import default_config, validate_train_config

# Sub-dicts whose keys are free (checked later by the method config class / the model).
OPEN_DICTS = ("init.config", "model.kwargs", "compare.overrides")
INIT_DATA = methods.DATA_KINDS  # "real" batches or a "random" shape spec (`Method.data`)


def base_config() -> ml_collections.ConfigDict:
  """The schema every config file fills in (defaults: Fashion-MNIST, cnn_small, NIO).

  Fields:
    name: run name; the default workdir is `runs/<name>`.
    workdir: output directory (None = `runs/<name>`).
    seed: seed of the model init and the data order (and the method's `seed` where its
      `Method.seeded` says so: MetaInit's Gaussian inputs under `init.data="random"`, LSUV's
      orthonormal kernels; unless `init.config.seed` is set).
    model.name / model.kwargs: `nio_jax.models.get(name, **kwargs)`; `num_classes` is
      taken from the dataset unless given.
    data: `nio_jax.data.make_loaders` arguments (`dataset`, `batch_size`, `train_subset`,
      `test_subset`, `data_dir`, `source`, `pad_to_32`, `augment`, `prefetch`).
    init.method: a registered method (`nio_jax.methods.available_methods()`).
    init.recipe: a recipe of the method (`Method.recipes`, e.g. GradInit's
      `GRADINIT_RECIPES`), merged under `init.config`.
    init.config: the method's hyper-parameters (None/empty = the method's defaults).
    init.batch_size: batch size of the init batches (None = data.batch_size).
    init.num_batches: batches drawn for the method (None = steps x batches per step).
    init.data: "real" (training batches) or "random" (a shape spec for Gaussian inputs, for
      the methods whose `Method.data` takes it: MetaInit).
    init.measure_batches: batches of the GC / gradient-norm report (0 = no report);
      init.measure_chunks / init.measure_overlap: its sub-batch setting (D, r).
    eval.steps: global steps after which the test accuracy is also measured, on the first
      `eval.subset` test images (None = all); the trainer evaluates every epoch end anyway.
    max_steps: stop training after this many steps (None = all epochs); the last step is
      then evaluated on the whole test set (`eval.last_on_full_test`, default True; False
      evaluates it on the `eval.subset` like the other `eval.steps`, so one curve uses one
      test set).
    train: `nio_jax.train.default_config()` (the published CIFAR recipe);
      `train.batch_size` follows `data.batch_size`.
    published: the paper's numbers for this experiment (Acc_1 / Acc_best in %, source).
    compare.methods: the methods `nio-jax compare` runs one after another on this config
      (same seed: the same initial params and the same data order); empty = `init.method`.
    compare.overrides: per method, `key=value` overrides applied to that method's run only,
      e.g. `{"gradinit": ("init.recipe=vgg19", "init.config.num_steps=40")}`.
  """
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

  # Evaluations besides the trainer's epoch ends, and an optional end inside an epoch.
  c.eval = ml_collections.ConfigDict()
  c.eval.steps = ()
  c.eval.subset = config_dict.placeholder(int)
  c.eval.last_on_full_test = True
  c.max_steps = config_dict.placeholder(int)

  c.train = default_config()
  c.train.batch_size = c.data.get_ref("batch_size")

  c.published = ml_collections.ConfigDict()
  c.published.acc_1 = config_dict.placeholder(float)
  c.published.acc_best = config_dict.placeholder(float)
  c.published.source = ""

  c.compare = ml_collections.ConfigDict()
  c.compare.methods = ()
  c.compare.overrides = ml_collections.ConfigDict()
  return c


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
    raise ConfigError(f"override {item!r} must look like key=value (e.g. train.num_epochs=2)")
  key, _, value = item.partition("=")
  key = key.strip()
  if key.startswith("config."):
    key = key[len("config.") :]
  if not key or any(not part.isidentifier() for part in key.split(".")):
    raise ConfigError(f"bad override key {key!r}: use dotted identifiers such as data.batch_size")
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
      raise ConfigError(
        f"unknown config key {'.'.join(parts[: i + 1])!r}; known under "
        f"{'.'.join(parts[:i]) or 'the root'}: {_known(node)}"
      )
    node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a group")
  parent, last = ".".join(parts[:-1]), parts[-1]
  if last not in node and parent not in OPEN_DICTS:
    raise ConfigError(
      f"unknown config key {key!r}; known under {parent or 'the root'}: {_known(node)}"
    )
  if isinstance(value, dict):
    value = ml_collections.ConfigDict(value)
  try:
    node[last] = value
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    if parent not in OPEN_DICTS and key not in OPEN_DICTS:
      raise ConfigError(f"cannot set {key}={value!r}: {e}") from None
    # Free-form dicts (method hyper-parameters, model kwargs) take any type: replace.
    del node[last]
    node[last] = value


# The configs shipped with the package (`configs/` in a source checkout links here).
SHIPPED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
  """The names of the config files shipped with the package (`--config NAME`)."""
  return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.py") if not p.name.startswith("_"))


def config_path(spec: str) -> tuple[str, str | None]:
  """`path.py[:arg]` or a bare `NAME[:arg]` -> (path of the file, arg).

  A path that exists is used as it is; a bare name (no directory part) that is not a file
  here is a config shipped with the package (`nio_jax/configs/NAME.py`), so
  `--config fmnist_nio` works from any install.
  """
  path, arg = spec, None
  if ":" in spec and not os.path.exists(spec):
    path, _, arg = spec.partition(":")
  if not os.path.exists(path) and os.sep not in path and "/" not in path:
    shipped = SHIPPED_CONFIGS / (path if path.endswith(".py") else path + ".py")
    if shipped.is_file():
      path = str(shipped)
  return path, arg


def absolute_config_spec(spec: str) -> str:
  """`path.py[:arg]` (or a shipped config's NAME) with an absolute path, so that a run's
  `run.json` reloads it from any directory."""
  path, arg = config_path(spec)
  path = os.path.abspath(path)
  return path if arg is None else f"{path}:{arg}"


def load_config_file(spec: str) -> tuple[ml_collections.ConfigDict, str, str | None]:
  """`path.py`, `path.py:arg` or a shipped config's `NAME[:arg]` -> (config, path, arg)
  (`config_path`). The file is Python (like ml_collections config files); its
  `get_config([arg])` builds the config."""
  path, arg = config_path(spec)
  p = pathlib.Path(path)
  module = _exec_config_file(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config()")
  try:
    cfg = module.get_config(arg) if arg is not None else module.get_config()
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{path}: {e}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return cfg, str(p), arg


def _exec_config_file(path: str):
  """The config file `path` run as a module of its own (config files are not a package)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise ConfigError(
      f"config file {path!r} not found; give a path, or the name of a shipped config: "
      f"{', '.join(shipped_configs())}"
    )
  name = "nio_jax_config_" + "".join(ch if ch.isalnum() else "_" for ch in p.stem)
  mod_spec = importlib.util.spec_from_file_location(name, p)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module


def config_module(name: str, relative_to: str):
  """The config file `name` next to `relative_to` (a config file's `__file__`) as a module:
  for an experiment config that calls a helper of its base config, e.g.
  `config_module("cifar10_base.py", __file__).experiment(...)`.

  Raises:
    ConfigError: the file does not exist.
  """
  return _exec_config_file(str(pathlib.Path(relative_to).resolve().parent / name))


def config_from(name: str, relative_to: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file `name` next to `relative_to` (a config file's
  `__file__`): how an experiment config starts from its dataset's base config, e.g.
  `config_from("fmnist_base.py", __file__)`."""
  return load_config_file(str(pathlib.Path(relative_to).resolve().parent / name))[0]


def load_config(spec: str, overrides: Sequence[str] = ()) -> tuple[ml_collections.ConfigDict, Any]:
  """Loads `spec`, applies `key=value` overrides and validates.

  An override that switches `init.method` away from the file's method drops the file's
  settings of the old method that the overrides did not set (`switch_method`).

  Returns:
    `(cfg, method config)`: the validated config and the method config validating it built
    (`build_method_config`). The experiment takes the second as `method_config=` (`start_run`,
    `train_run`, `init_run`, `build`), so a run's method config is built once.
  """
  cfg, _, _ = load_config_file(spec)
  file_method = cfg.init.method
  keys = []
  for item in overrides:
    key, value = parse_override(item)
    apply_override(cfg, key, value)
    keys.append(key)
  if cfg.init.method != file_method:
    switch_method(cfg, keys)
  return cfg, validate_config(cfg)


def switch_method(cfg, set_keys: Sequence[str] = ()) -> list[str]:
  """After `init.method` changed: drops the settings of the previous method that were not set
  by the overrides `set_keys` (dotted keys, in the order they were applied).

  Dropped: every `init.config` key not set by an override (the file's hyper-parameters
  belong to the file's method; an explicit `init.config={...}` keeps its keys), an
  `init.recipe` the new method cannot take (its `Method.recipes` is empty), and an
  `init.data` it does not accept (`Method.data`; set back to its first kind). A key that the overrides did set
  stays, and the new method's config class rejects it if it does not know it.

  Returns:
    The dropped keys (dotted).
  """
  user: set[str] = set()
  whole = False
  for key in set_keys:
    if key == "init.config":
      whole, user = True, set()
    elif key.startswith("init.config."):
      user.add(key.split(".")[2])
  dropped = []
  if not whole:
    for k in list(cfg.init.config.keys()):
      if k not in user:
        del cfg.init.config[k]
        dropped.append(f"init.config.{k}")
  try:
    m = methods.get_method(cfg.init.method)
  except ValueError:
    return dropped  # unknown method: validate_config names the known ones
  if cfg.init.get("recipe") is not None and "init.recipe" not in set_keys and not m.recipes:
    cfg.init.recipe = None
    dropped.append("init.recipe")
  if cfg.init.data not in m.data and "init.data" not in set_keys:
    cfg.init.data = m.data[0]
    dropped.append("init.data")
  return dropped


def build_method_config(cfg) -> Any:
  """The method config to pass to `nio_jax.methods.initialize` (validated): the method's
  config class built from `init.config` (a GradInit `init.recipe` merged under it).

  Built anew on each call. `validate_config` (hence `load_config`) returns the one it builds,
  and the experiment's functions take it as `method_config=`, so one run's path builds it
  once; called without it, they build it from `cfg` themselves.
  """
  try:
    m = methods.get_method(cfg.init.method)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return _build_method_config(cfg, m)


def _build_method_config(cfg, m) -> Any:
  values = cfg.init.config.to_dict()
  recipe = cfg.init.get("recipe")
  try:
    if recipe is not None:
      if not m.recipes:
        with_recipes = [n for n in methods.available_methods() if methods.get_method(n).recipes]
        raise ConfigError(
          f"init.recipe={recipe!r}: method {m.name!r} has no recipes (methods with recipes: "
          f"{', '.join(with_recipes) or 'none'})"
        )
      if recipe not in m.recipes:
        raise ConfigError(
          f"unknown {m.label} recipe {recipe!r}; known: {', '.join(sorted(m.recipes))}"
        )
      values = {**m.recipes[recipe], **values}
    if m.is_seeded(cfg.init.data) and "seed" not in values:
      # the run's seed also draws e.g. MetaInit's Gaussian inputs, LSUV's orthonormal kernels
      values["seed"] = int(cfg.seed)
    if m.config_cls is not None and hasattr(m.config_cls, "create"):
      return m.config_cls.create(values)
  except (ValueError, TypeError) as e:
    hint = ""
    if "unknown" in str(e) and "key" in str(e):
      hint = (
        " Remove that key (from --set init.config.KEY=... or the config file), or start "
        "from the method's defaults with --set init.config={}."
      )
    raise ConfigError(f"init.config for method {m.name!r}: {e}{hint}") from None
  return values or None


def search_batches(cfg, mcfg) -> int:
  """Batches the configured method consumes: `init.num_batches`, else the method's
  `Method.num_batches(mcfg)` (its config's `num_steps` x its batches per step)."""
  if cfg.init.get("num_batches"):
    return int(cfg.init.num_batches)
  return methods.get_method(cfg.init.method).num_batches(mcfg)


def validate_config(cfg) -> Any:
  """Raises ConfigError (with the known names) for an unknown model, dataset or method, or a bad
  value; the method config and the training config are validated by their own classes.

  Returns:
    The method config it built (`build_method_config`).
  """
  for group in ("model", "data", "init", "train"):
    if group not in cfg:
      raise ConfigError(
        f"config has no {group!r} group; build it on nio_jax.experiment_config.base_config()"
      )
  if cfg.model.name not in models.names():
    raise ConfigError(
      f"unknown model {cfg.model.name!r}; known models: {', '.join(models.names())}"
    )
  if cfg.data.dataset not in data.DATASETS:
    raise ConfigError(
      f"unknown dataset {cfg.data.dataset!r}; known datasets: {', '.join(data.DATASETS)}"
    )
  if cfg.init.data not in INIT_DATA:
    raise ConfigError(f"init.data must be one of {INIT_DATA}, got {cfg.init.data!r}")
  try:
    m = methods.get_method(cfg.init.method)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if cfg.init.data not in m.data:
    takers = [n for n in methods.available_methods() if cfg.init.data in methods.get_method(n).data]
    raise ConfigError(
      f"init.data={cfg.init.data!r} is not data method {m.name!r} takes (it takes "
      f"{', '.join(map(repr, m.data))}); init.data={cfg.init.data!r} is for method(s) "
      f"{', '.join(map(repr, takers))} only"
    )
  for k in ("batch_size",):
    if int(cfg.data[k]) < 1:
      raise ConfigError(f"data.{k} must be >= 1")
  if int(cfg.init.measure_batches) < 0:
    raise ConfigError("init.measure_batches must be >= 0")
  if "eval" in cfg:
    steps = tuple(cfg.eval.steps or ())
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
      raise ConfigError(f"eval.steps must be global steps >= 1, got {steps!r}")
    if cfg.eval.subset is not None and int(cfg.eval.subset) < 1:
      raise ConfigError("eval.subset must be >= 1 (or None for the whole test set)")
  if cfg.get("max_steps") is not None and int(cfg.max_steps) < 1:
    raise ConfigError("max_steps must be >= 1 (or None for all epochs)")
  mcfg = build_method_config(cfg)
  try:
    validate_train_config(cfg.train, prefix="train")  # the train group's own checks
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from None
  if cfg.train.get("gc_every") and int(cfg.init.measure_batches) < 1:  # spans two groups
    raise ConfigError(
      "train.gc_every measures GC on the GC report's batches: set init.measure_batches >= 1"
    )
  return mcfg


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
          raise ConfigError(f"{a} needs a value")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    elif a in ("--set", "-s"):
      if i + 1 >= len(argv):
        raise ConfigError("--set needs key=value")
      overrides.append(argv[i + 1])
      i += 1
    elif a.startswith("--set="):
      overrides.append(a[len("--set=") :])
    else:
      rest.append(a)
    i += 1
  return rest, overrides
