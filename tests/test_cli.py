"""The `nio-jax` command line and the experiment configs (tiny: a 256-image run end to end)."""

import builtins
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from nio_jax import cli
from nio_jax import experiment_config as ncfg

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


def _module(path):
  spec = importlib.util.spec_from_file_location("cfgmod_" + path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _config_specs():
  """Every config (every cell / arm for configs that take an argument)."""
  out = []
  for path in CONFIGS:
    if path.name.startswith("_"):
      continue
    mod = _module(path)
    if not hasattr(mod, "get_config"):  # e.g. a benchmarks/sweep.py grid, not a CLI config
      continue
    if hasattr(mod, "cells"):
      out += [f"{path}:{c}" for c in mod.cells()]
    elif hasattr(mod, "ARMS"):
      out += [f"{path}:{a}" for a in mod.ARMS]
    else:
      out.append(str(path))
  return out


def test_every_config_loads_and_validates():
  specs = _config_specs()
  names = set()
  for spec in specs:
    cfg, _ = ncfg.load_config(spec)
    names.add(cfg.name)
    assert cfg.train.batch_size == cfg.data.batch_size
    assert _module(pathlib.Path(spec.split(":")[0])).__doc__.count("nio-jax ") >= 1
  assert len(names) == len(specs), "two configs share a name (and so a default workdir)"
  assert sum(s.count("cifar10_table.py") for s in specs) == 5 * 6
  # The schema lives in nio_jax.experiment_config, which every config file imports (no CLI import).
  for path in CONFIGS:
    src = path.read_text()
    assert "from nio_jax.experiment_config import" in src and "nio_jax.cli" not in src, path.name


def test_nio_settings_live_only_in_nio_config():
  """No config file retypes a released NIO setting: what the NIO cells leave unset comes from
  the NIOConfig defaults."""
  import nio_jax

  defaults = nio_jax.NIOConfig()
  for spec in _config_specs():
    cfg, _ = ncfg.load_config(spec)
    if cfg.init.method != "nio":
      continue
    for k, v in cfg.init.config.to_dict().items():
      assert getattr(defaults, k) != v, f"{spec}: init.config.{k}={v!r} repeats the default"


def test_cifar_table_cells_and_published_numbers():
  mod = _module(ROOT / "configs" / "cifar10_table.py")
  cfg = mod.get_config("resnet110_bn,gradinit")
  assert (cfg.published.acc_1, cfg.published.acc_best) == (38.2, 95.4)
  assert cfg.init.recipe == "resnet110_bn" and cfg.model.kwargs.norm == "bn"
  assert ncfg.build_method_config(cfg).lr == 1e-3
  cfg = mod.get_config("vgg19_bn,warmup")
  assert cfg.train.baseline == "extra_epoch_warmup" and cfg.init.method == "kaiming"
  assert (cfg.published.acc_1, cfg.published.acc_best) == (53.5, 94.7)
  assert mod.get_config("resnet1202_bn,const").train.baseline == "extra_epoch_constant"
  assert mod.get_config("resnet110,nio").published.acc_1 is None
  with pytest.raises(ncfg.ConfigError, match="resnet110_bn"):
    ncfg.load_config(str(ROOT / "configs" / "cifar10_table.py") + ":resnet9,gradinit")


def test_load_config_returns_the_method_config_it_built(monkeypatch):
  """`load_config` checks the method config by building it, and returns it (the CLI hands it
  to the experiment as `method_config=`): one build. `build_method_config` builds anew, so a
  changed `init.config` is built and checked anew."""
  from nio_jax import methods

  calls = []
  cls = methods.get_method("nio").config_cls
  real = cls.create  # bound to the class
  monkeypatch.setattr(cls, "create", lambda values=None: calls.append("nio") or real(values))
  cfg, first = ncfg.load_config(str(ROOT / "configs" / "fmnist_nio.py"), ["seed=12345"])
  assert calls == ["nio"] and isinstance(first, cls)
  assert ncfg.build_method_config(cfg) == first and len(calls) == 2
  cfg.init.config.num_steps = int(first.num_steps) + 1
  assert ncfg.build_method_config(cfg).num_steps == first.num_steps + 1 and len(calls) == 3
  cfg.init.config.num_steps = -1
  with pytest.raises(ncfg.ConfigError, match="num_steps"):
    ncfg.build_method_config(cfg)


def test_train_group_errors_name_the_override_key():
  cfg = ncfg.base_config()
  cfg.train.momentum = 1.5
  with pytest.raises(ncfg.ConfigError, match=r"train\.momentum=1\.5 must be < 1"):
    ncfg.validate_config(cfg)


def test_parse_value_literals_only():
  assert ncfg.parse_value("3") == 3 and ncfg.parse_value("1e-3") == 1e-3
  assert ncfg.parse_value("(16, 32)") == (16, 32)
  assert ncfg.parse_value("true") is True and ncfg.parse_value("None") is None
  assert ncfg.parse_value("'x'") == "x" and ncfg.parse_value("cnn_small") == "cnn_small"
  evil = "__import__('os').system('echo pwned')"
  assert ncfg.parse_value(evil) == evil  # stays a string
  assert ncfg.parse_override("--config.x=1".lstrip("-")) == ("x", 1)
  with pytest.raises(ncfg.ConfigError):
    ncfg.parse_override("no_equals_sign")
  with pytest.raises(ncfg.ConfigError):
    ncfg.parse_override("a.__class__ x=1")


def test_overrides_apply_and_check():
  cfg = ncfg.base_config()
  rest, ov = ncfg.split_overrides(
    [
      "train",
      "--config",
      "c.py",
      "--config.train.num_epochs=3",
      "--set",
      "data.batch_size=64",
      "--config.init.config.gamma",
      "2.5",
      "--set=model.kwargs.hidden=(8,)",
    ]
  )
  assert rest == ["train", "--config", "c.py"]
  for item in ov:
    ncfg.apply_override(cfg, *ncfg.parse_override(item))
  assert cfg.train.num_epochs == 3
  assert cfg.data.batch_size == 64 and cfg.train.batch_size == 64  # follows data.batch_size
  assert cfg.init.config.gamma == 2.5 and cfg.model.kwargs.hidden == (8,)
  with pytest.raises(ncfg.ConfigError, match="known under train: .*num_epochs"):
    ncfg.apply_override(cfg, "train.num_epoch", 3)
  with pytest.raises(ncfg.ConfigError, match="known under the root: .*model"):
    ncfg.apply_override(cfg, "modle.name", "mlp")
  with pytest.raises(ncfg.ConfigError, match="cannot set train.num_epochs"):
    ncfg.apply_override(cfg, "train.num_epochs", "three")
  ncfg.apply_override(cfg, "model.kwargs.hidden", 64)  # free-form dicts take any type
  ncfg.apply_override(cfg, *ncfg.parse_override("model.kwargs={'channels': (8, 16)}"))
  assert cfg.model.kwargs.to_dict() == {"channels": (8, 16)}


@pytest.mark.parametrize(
  "override,known",
  [
    ("model.name=resnet9", "cnn_small"),
    ("init.method=magic", "gradinit"),
    ("data.dataset=mnist", "fashion_mnist"),
    ("init.config.no_such_key=1", "num_steps"),
    ("init.recipe=vgg11", "resnet110_bn"),
    # a GradInit key the user sets explicitly, given to Fixup: the fix is named
    (("init.method=fixup", "init.config.eta=0.1"), "num_branches"),
    (("init.method=fixup", "init.config.eta=0.1"), "--set init.config={}"),
  ],
)
def test_unknown_names_list_the_known_ones(override, known, capsys):
  cfg_path = str(ROOT / "configs" / "fmnist_gradinit.py")
  sets = [f"--set={o}" for o in ((override,) if isinstance(override, str) else override)]
  rc = cli.main(["init", "--config", cfg_path, "--workdir", "/nonexistent/never", *sets])
  err = capsys.readouterr().err
  assert rc == 2 and "nio-jax: error:" in err and known in err, err


def test_switching_method_drops_the_files_method_settings():
  """`--set init.method=lsuv` on a NIO config: the file's NIO keys (gamma, num_steps) are
  dropped, the user's own keys stay (and an unknown one names `--set init.config={}`);
  a GradInit recipe and MetaInit's random inputs go with their method."""
  nio = str(ROOT / "configs" / "fmnist_nio.py")
  cfg, _ = ncfg.load_config(nio, ["init.method=lsuv"])
  assert cfg.init.config.to_dict() == {} and ncfg.build_method_config(cfg).tol == 0.1
  cfg, _ = ncfg.load_config(nio, ["init.method=gradinit", "init.config.num_steps=7"])
  assert cfg.init.config.to_dict() == {"num_steps": 7}
  cfg, _ = ncfg.load_config(nio, ["init.config={'num_steps': 4}", "init.method=metainit"])
  assert cfg.init.config.to_dict() == {"num_steps": 4}  # a whole dict is the user's
  with pytest.raises(ncfg.ConfigError, match=r"\['gamma'\].*--set init\.config=\{\}"):
    ncfg.load_config(nio, ["init.method=lsuv", "init.config.gamma=2.0"])
  table = str(ROOT / "configs" / "cifar10_table.py")
  cfg, _ = ncfg.load_config(table + ":vgg19,gradinit", ["init.method=nio"])
  assert cfg.init.recipe is None and cfg.init.config.to_dict() == {}
  assert ncfg.load_config(table + ":vgg19,gradinit")[0].init.recipe == "vgg19"  # no switch
  cfg, _ = ncfg.load_config(str(ROOT / "configs" / "fmnist_metainit.py"), ["init.method=nio"])
  assert cfg.init.data == "real"


def test_config_by_shipped_name():
  """`--config NAME[:ARG]` finds the config shipped in the package (`configs/` of a checkout
  links to the same files); an unknown name lists the shipped ones."""
  assert (ROOT / "configs").resolve() == ncfg.SHIPPED_CONFIGS
  a, _ = ncfg.load_config("fmnist_nio")
  b, _ = ncfg.load_config(str(ROOT / "configs" / "fmnist_nio.py"))
  assert a.to_dict() == b.to_dict()
  assert (
    ncfg.load_config("cifar10_table:vgg19,nio")[0].name
    == ncfg.load_config(str(ROOT / "configs" / "cifar10_table.py") + ":vgg19,nio")[0].name
  )
  with pytest.raises(ncfg.ConfigError, match="shipped config: .*fmnist_nio"):
    ncfg.load_config("fmnist_nop")


@pytest.mark.parametrize("sub", ["init", "train", "compare", "measure"])
def test_subcommand_help_shows_the_override_syntax(sub, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([sub, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--set key.path=value" in out and "e.g. --set init.config.num_steps=50" in out
  assert "example:" in out and f"nio-jax {sub} " in out
  if sub != "measure":
    assert "--overwrite" in out


def test_measure_names_a_missing_directory(tmp_path, capsys):
  missing = tmp_path / "no_such_run"
  assert cli.main(["measure", str(missing)]) == 2
  assert f"nio-jax: error: run directory not found: {missing}" in capsys.readouterr().err


def test_missing_dataset_is_a_config_error(tmp_path, capsys):
  """No Fashion-MNIST files where data.data_dir points (and no prepared TFDS copy): one
  `nio-jax: error:` naming $NIO_JAX_DATA, data.data_dir and the files, exit 2."""
  argv = ["init", "--config", str(ROOT / "configs" / "fmnist_nio.py"), "--no-progress"]
  argv += ["--workdir", str(tmp_path / "w"), f"--set=data.data_dir={tmp_path / 'nodata'}"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("nio-jax: error:") == 1 and "Traceback" not in err, err
  for text in ("not found", "NIO_JAX_DATA=DIR", "--set data.data_dir=DIR", "t10k-images"):
    assert text in err, (text, err)


def test_malicious_override_is_a_string_never_code(tmp_path, monkeypatch, capsys):
  marker = tmp_path / "pwned"
  evil = f"__import__('os').system('touch {marker}')"

  def no_eval(*a, **k):
    raise AssertionError("eval/exec called on an override value")

  # Parsing and applying overrides must not evaluate anything.
  cfg = ncfg.base_config()
  with monkeypatch.context() as m:
    m.setattr(builtins, "eval", no_eval)
    m.setattr(builtins, "exec", no_eval)
    key, value = ncfg.parse_override(f"data.dataset={evil}")
    ncfg.apply_override(cfg, key, value)
    assert cfg.data.dataset == evil
    with pytest.raises(ncfg.ConfigError):  # a string where an int belongs is rejected
      ncfg.apply_override(cfg, *ncfg.parse_override(f"data.batch_size={evil}"))
  rc = cli.main(
    [
      "init",
      "--config",
      str(ROOT / "configs" / "fmnist_nio.py"),
      "--workdir",
      str(tmp_path / "w"),
      f"--config.data.dataset={evil}",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and "unknown dataset" in err and "fashion_mnist" in err
  assert not marker.exists()


def test_bench_without_torch_names_the_extra(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  assert cli.main(["bench", "--models", "mlp", "--out", "/nonexistent"]) == 2
  assert "pip install 'nio_jax[torch]'" in capsys.readouterr().err


def test_library_never_imports_torch():
  """Every module of nio_jax except the benchmark subpackage imports without torch.

  A fresh interpreter imports them all (torch is installed in the test environment, so an
  import anywhere would show up in sys.modules); `nio_jax.bench` is the one exception, and only
  `nio-jax bench` imports it.
  """
  code = (
    "import importlib, pathlib, sys\n"
    "import nio_jax\n"
    "root = pathlib.Path(nio_jax.__file__).parent\n"
    "files = [p.relative_to(root.parent).with_suffix('') for p in root.rglob('*.py')]\n"
    "names = ['.'.join(f.parts).removesuffix('.__init__') for f in files]\n"
    "names = sorted(n for n in names if not n.startswith('nio_jax.bench'))\n"
    "for n in names:\n"
    "  importlib.import_module(n)\n"
    "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
    "print(len(names), 'nio_jax.cli' in names, 'nio_jax.bench' in sys.modules, bad[:3])\n"
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-2000:]
  count, has_cli, bench_loaded, bad = out.stdout.split(maxsplit=3)
  assert int(count) >= 20 and has_cli == "True"  # the walk really covered the package
  assert bench_loaded == "False", "a library module imports nio_jax.bench"
  assert bad.strip() == "[]", f"the library imported torch: {bad}"


def test_console_script_and_help(capsys):
  from importlib.metadata import entry_points

  eps = [e for e in entry_points(group="console_scripts") if e.name == "nio-jax"]
  if not eps:
    pytest.skip("nio-jax console script not installed (pip install -e .)")
  assert eps[0].value == "nio_jax.cli:main" and eps[0].load() is cli.main
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for sub in ("init", "train", "measure", "report", "bench"):
    assert sub in out
  assert "--set key.path=value" in out


# ------------------------------------------------------------------ end to end, tiny subset

TINY = [
  "model.name=mlp",
  "model.kwargs={'hidden': (32,)}",
  "data.train_subset=256",
  "data.test_subset=256",
  "data.batch_size=64",
  "data.prefetch=0",
  "init.batch_size=32",
  "init.config.num_steps=3",
  "init.measure_batches=1",
  "train.num_epochs=1",
  "train.eval_batch_size=256",
  "train.log_every=2",
]


def _need_fmnist():
  from nio_jax.data import find_fashion_mnist_dir

  try:
    find_fashion_mnist_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  _need_fmnist()
  base = tmp_path_factory.mktemp("cli_runs")
  cfg = str(ROOT / "configs" / "fmnist_nio.py")
  sets = [f"--set={s}" for s in TINY]
  rc_train = cli.main(
    [
      "train",
      "--config",
      cfg,
      "--workdir",
      str(base / "train"),
      "--no-progress",
      *sets,
      "--set=init.measure_batches=0",
    ]
  )
  rc_init = cli.main(
    ["init", "--config", cfg, "--workdir", str(base / "init"), "--no-progress", *sets]
  )
  return base, rc_train, rc_init


def test_train_end_to_end(tiny_runs):
  base, rc, _ = tiny_runs
  assert rc == 0
  w = base / "train"
  for f in (
    "init_params.msgpack",
    "final_params.msgpack",
    "metrics.jsonl",
    "init_history.json",
    "init_report.json",
    "scales.json",
    "run_record.json",
    "curves.png",
    "report.md",
    "report_training.png",
    "report_search.png",
    "report_scales.png",
    "run.json",
  ):
    assert (w / f).is_file(), f
  hist = json.loads((w / "init_history.json").read_text())
  assert hist["method"] == "nio" and len(hist["history"]["gc"]) == 3
  assert hist["num_batches"] == 3 and hist["config"]["num_steps"] == 3
  evals = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
  assert len(evals) == 1 and 0 <= evals[0]["test_acc"] <= 1
  rep = json.loads((w / "init_report.json").read_text())
  assert rep["before"] is None and rep["after"] is None  # init.measure_batches=0 here
  assert "Acc_1 (%)" in (w / "report.md").read_text()
  # One record of the run, which the report reads: the accuracies of the trainer's result.
  rec = json.loads((w / "run_record.json").read_text())
  assert rec["status"] == "finished" and not rec["resumed"] and rec["search_steps"] == 3
  assert rec["acc_1"] == rec["acc_best"] == rec["final_test_acc"] == evals[0]["test_acc"]
  assert f"| {100 * rec['acc_1']:.2f} |" in (w / "report.md").read_text()


def test_diverged_training_is_its_own_error(tmp_path, monkeypatch, capsys):
  from nio_jax import experiment

  monkeypatch.setattr(experiment, "train_run", lambda cfg, w, **k: {"status": "diverged at step 7"})
  argv = ["train", "--config", str(ROOT / "configs" / "fmnist_nio.py"), "--workdir", str(tmp_path)]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert "nio-jax: error: training diverged at step 7" in err and "checkpoints" in err


def test_init_end_to_end_and_measure(tiny_runs, capsys):
  base, _, rc = tiny_runs
  assert rc == 0
  w, t = base / "init", base / "train"
  for f in ("init_params.msgpack", "init_history.json", "init_report.json", "scales.json"):
    assert (w / f).is_file(), f
  assert not (w / "metrics.jsonl").exists()
  capsys.readouterr()
  # One call: the msgpack params of `init`, step 0 of the trainer's orbax checkpoints (= the
  # initialised params of `train`) and the model's own init.
  assert (
    cli.main(
      [
        "measure",
        str(t),
        "--params",
        str(w / "init_params.msgpack"),
        "--checkpoint",
        "0",
        "--fresh",
        "--batches",
        "1",
        "--no-progress",
        "--json",
        str(w / "m.json"),
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "init_params.msgpack" in out and "checkpoint 0" in out and "fresh" in out
  m = json.loads((w / "m.json").read_text())
  rep = json.loads((w / "init_report.json").read_text())
  assert set(rep["before"]) >= {"gc", "grad_norm"} and set(rep["after"]) >= {"gc", "grad_norm"}
  # Same config and seed: `train` ran the same search on the same batches as `init`.
  for key in (str(w / "init_params.msgpack"), "checkpoint 0"):
    assert m[key]["gc"] == pytest.approx(rep["after"]["gc"], rel=1e-4, abs=1e-5)
    assert m[key]["grad_norm"] == pytest.approx(rep["after"]["grad_norm"], rel=1e-4)
  assert m["fresh (model init)"]["gc"] == pytest.approx(rep["before"]["gc"], rel=1e-4, abs=1e-5)


def test_report_tables_and_plots(tiny_runs, capsys):
  base, _, _ = tiny_runs
  out = base / "report"
  assert cli.main(["report", str(base / "train"), str(base / "init"), "--out", str(out)]) == 0
  md = (out / "report.md").read_text()
  assert "| run | model |" in md and "| train | mlp | fashion_mnist | nio |" in md
  assert "| init | mlp |" in md
  for f in (
    "report_training.png",
    "report_search.png",
    "report_scales_train.png",
    "report_scales_init.png",
  ):
    assert (out / f).stat().st_size > 1000, f


def test_rerun_resumes_the_same_config_and_refuses_another(tmp_path, capsys):
  """The same config in the same workdir resumes (no new search, and it says so); another
  config is refused with exit 2 naming --overwrite and --workdir, leaving the run as it
  was; --overwrite deletes that run's files (only those) and starts afresh."""
  _need_fmnist()
  w = tmp_path / "run"
  cfg = str(ROOT / "configs" / "fmnist_nio.py")
  sets = [f"--set={s}" for s in TINY] + ["--set=init.measure_batches=0", "--set=max_steps=2"]
  base = ["--config", cfg, "--workdir", str(w), "--no-progress", *sets]
  two = "--set=init.config.num_steps=2"
  assert cli.main(["train", *base, two]) == 0
  history = (w / "init_history.json").read_text()
  assert json.loads(history)["config"]["num_steps"] == 2
  capsys.readouterr()
  # Same config, a result-neutral key changed (progress, prefetch): resume, no search.
  assert cli.main(["train", *base, two, "--set=data.prefetch=1"]) == 0
  out = capsys.readouterr().out
  assert "resuming from step 2, search skipped" in out
  assert (w / "init_history.json").read_text() == history
  # Another config (num_steps 3; for init too): refused, nothing in the workdir touched.
  before = {p.name: p.stat().st_mtime_ns for p in w.iterdir()}
  for argv in (["train", *base, "--set=init.config.num_steps=3"], ["init", *base]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nio-jax: error: workdir" in err and "holds a run of another config" in err
    assert "--overwrite" in err and "--workdir" in err, err
    assert "init.config.num_steps: 2 -> " in err, err
  assert {p.name: p.stat().st_mtime_ns for p in w.iterdir()} == before  # nothing touched
  (w / "notes.txt").write_text("mine")
  assert cli.main(["init", *base, "--set=init.config.num_steps=3", "--overwrite"]) == 0
  assert "deleted the earlier run's files" in capsys.readouterr().out
  assert json.loads((w / "init_history.json").read_text())["config"]["num_steps"] == 3
  assert not (w / "checkpoints").exists() and not (w / "run_record.json").exists()
  assert (w / "notes.txt").read_text() == "mine"
  assert json.loads((w / "config.json").read_text())["init"]["config"]["num_steps"] == 3
