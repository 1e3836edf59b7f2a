"""The sweep runner on a miniature grid (checks that it works, not results): every run goes
through `nio_jax.experiment.train_run`; the table, per-run JSON and plots are written; a
re-run skips finished runs (also from their committed JSON alone); an interrupted run starts
afresh; each record carries its optimiser recipe and quiet verdict. Also: the issue-13/14
grid's configs all validate, with the protocol's numbers."""

import copy
import json
import shutil

import pytest

from benchmarks import sweep
from nio_jax import methods
from nio_jax.experiment_config import base_config, build_method_config


def _fmnist_or_skip():
  try:
    from nio_jax import data

    data.load_fashion_mnist("test")
  except (FileNotFoundError, OSError) as e:  # pragma: no cover - dataset not installed
    pytest.skip(f"Fashion-MNIST not available: {e}")


def _mini_grid():
  def cfg(method, extra=None):
    c = base_config()
    c.name = f"mini_{method}"
    c.model.name = "mlp"
    c.model.kwargs.hidden = (16, 16)
    c.data.batch_size = 32
    c.data.train_subset = 256  # 8 steps per epoch
    c.data.test_subset = 100
    c.init.method = method
    c.init.batch_size = 16
    c.init.measure_batches = 1
    c.eval.steps = (2, 4)
    c.eval.subset = 50
    c.max_steps = 6  # inside the first epoch: step 6 is evaluated on the whole test set
    c.train.num_epochs = 1
    c.train.schedule = "constant"
    c.train.lr = 0.05
    c.train.log_every = 2
    c.train.progress = False
    c.train.plots = False
    for k, v in (extra or {}).items():
      c.init.config[k] = v
    return c

  cells = [
    {"model": "mlp", "method": "kaiming", "seeds": [0, 1], "config": cfg("kaiming")},
    {"model": "mlp", "method": "nio", "seeds": [0, 1], "config": cfg("nio", {"num_steps": 2})},
    {
      "model": "mlp",
      "method": "gradinit",
      "seeds": [0],
      "config": cfg("gradinit", {"num_steps": 2, "lookahead": "thirds", "batch_size": None}),
    },
  ]
  meta = cfg("metainit", {"num_steps": 2})
  meta.init.data = "random"  # Gaussian inputs: the runner hands MetaInit a shape spec
  cells.append({"model": "mlp", "method": "metainit", "seeds": [1], "config": meta})
  return {"name": "test_mini", "eval_steps": [2, 4], "cells": cells}


def test_mini_sweep_end_to_end_and_resume(tmp_path):
  pytest.importorskip("matplotlib")
  _fmnist_or_skip()
  grid, root, res = _mini_grid(), tmp_path / "runs", tmp_path / "results"
  out = sweep.run_grid(grid, root, res, log=lambda *_: None)
  assert out["statuses"] == ["finished"] * 6 and not out["missing"]
  d = res / "sweep_test_mini"
  rec = json.loads((d / "runs" / "mlp__nio__seed1.json").read_text())
  assert set(rec["acc_steps"]) == {"2", "4", "6"} and rec["step"] == 6
  assert rec["final_test_acc"] == rec["acc_steps"]["6"]
  assert rec["search_steps"] == 2 and rec["search_seconds"] > 0
  assert rec["train_seconds"] > 0 and rec["eval_seconds"] > 0 and rec["search_rel_step"] > 0
  assert rec["before"]["gc"] != rec["after"]["gc"]
  # The recipe that ran (an MLP: the no-norm recipe) and the run's quiet verdict.
  assert rec["recipe"]["name"] == "no_norm" and rec["recipe"]["grad_clip_norm"] == 1.0
  assert rec["recipe"]["slow_lr_factor"] == 0.1 and rec["recipe"]["weight_decay"] == 1e-4
  q = rec["quiet"]
  assert q["verdict"] in ("QUIET", "NOISY") and 0.0 <= q["other_cpu_share"] <= 1.0
  assert q["threshold"] == 0.05 and q["wall_s"] > 0 and q["own_cpu_s"] > 0
  assert (q["verdict"] == "NOISY") == (q["other_cpu_share"] > 0.05)
  # GradInit with lookahead "thirds" takes one batch per step: 2 steps, 2 batches.
  gi = json.loads((root / "test_mini/mlp/gradinit/seed0/init_history.json").read_text())
  assert gi["num_batches"] == 2
  mi = json.loads((d / "runs" / "mlp__metainit__seed1.json").read_text())
  assert mi["search_steps"] == 2 and mi["before"]["gc"] != mi["after"]["gc"]
  row = out["table"]["mlp"]["kaiming"]
  assert row["seeds"] == [0, 1] and row["acc@2"][2] == 2 and row["acc_end"][1] >= 0
  md = (d / "table.md").read_text()
  assert "| kaiming | 2 |" in md and "| nio | 2 |" in md and "| gradinit | 1 |" in md
  assert (d / "mlp_curves.png").stat().st_size > 1000
  mtime = (root / "test_mini/mlp/nio/seed0/run_record.json").stat().st_mtime_ns

  assert (d / "significant.md").read_text().startswith("# Sweep `test_mini`")

  # Re-run: every run is skipped; an unfinished run (no record, and so no committed JSON)
  # starts again from scratch.
  (root / "test_mini/mlp/kaiming/seed1/run_record.json").unlink()
  (d / "runs" / "mlp__kaiming__seed1.json").unlink()
  out2 = sweep.run_grid(grid, root, res, plots=False, log=lambda *_: None)
  assert out2["statuses"] == ["skipped", "finished"] + ["skipped"] * 4
  assert (root / "test_mini/mlp/nio/seed0/run_record.json").stat().st_mtime_ns == mtime
  again = json.loads((root / "test_mini/mlp/kaiming/seed1/run_record.json").read_text())
  assert again["resumed"] is False and again["step"] == 6

  # A fresh clone has the committed per-run JSON but no run directories: collect still
  # builds the whole table from them, and the sweep skips those runs (adding seeds to a
  # grid runs only the new ones).
  shutil.rmtree(root)
  col = sweep.collect(grid, root, res, plots=False, log=lambda *_: None)
  assert not col["missing"] and col["table"]["mlp"]["nio"]["seeds"] == [0, 1]
  assert col["table"]["mlp"]["kaiming"]["acc@2"] == out2["table"]["mlp"]["kaiming"]["acc@2"]
  out3 = sweep.run_grid(grid, root, res, plots=False, log=lambda *_: None)
  assert out3["statuses"] == ["skipped"] * 6 and not root.exists()
  # ... unless the committed record is another config's (here: another method's).
  other = copy.deepcopy(grid)
  other["cells"][0]["config"].name = "mini_other"
  assert sweep.committed_record(res, other, other["cells"][0], 0) is None
  assert sweep.committed_record(res, grid, grid["cells"][0], 0)["seed"] == 0


def test_quiet_verdict_follows_the_quiet_tool_rule():
  """Other processes above 5 % of the machine: NOISY; unmeasured (no /proc/stat): None."""
  base = dict(cores=2, wall_s=10.0, own_cpu_s=9.0, load_before=None, load_after=None)
  q = sweep.quiet_verdict({**base, "other_share": 0.04, "other_cpu_s": 0.8, "noisy": False})
  assert (q["verdict"], q["other_cpu_share"], q["threshold"]) == ("QUIET", 0.04, 0.05)
  q = sweep.quiet_verdict({**base, "other_share": 0.06, "other_cpu_s": 1.2, "noisy": True})
  assert q["verdict"] == "NOISY" and q["other_cpu_s"] == 1.2
  q = sweep.quiet_verdict({**base, "other_share": None, "other_cpu_s": None, "noisy": None})
  assert q["verdict"] is None and q["other_cpu_share"] is None


def test_logged_recipe_reads_the_trainers_config_record(tmp_path):
  """The recipe in a run's record comes from the first `config` line of `metrics.jsonl`."""
  from nio_jax.train import default_config, logged_recipe

  c = default_config().to_dict()
  path = tmp_path / "metrics.jsonl"
  assert logged_recipe(path) is None
  line = {"type": "config", "step": 0, "no_norm_recipe": False, "grad_clip_norm": None}
  path.write_text(json.dumps({**line, "config": {**c, "lr": 0.1}}) + "\n")
  r = logged_recipe(path)
  assert (r["name"], r["lr"], r["weight_decay"]) == ("norm", 0.1, 1e-4)
  assert r["slow_lr_factor"] is None and r["grad_clip_norm"] is None
  line.update(no_norm_recipe=True, grad_clip_norm=1.0)
  path.write_text(json.dumps({**line, "config": c}) + "\n" + '{"type": "train", "step": 5}\n')
  r = logged_recipe(path)
  assert (r["name"], r["slow_lr_factor"], r["grad_clip_norm"]) == ("no_norm", 0.1, 1.0)
  assert r["lr"] == c["base_lr"] * c["batch_size"] / c["lr_reference_batch"]


def test_fmnist_grid_follows_the_protocol():
  grid = sweep.load_grid("fmnist")
  cells = {(c["model"], c["method"]): c for c in grid["cells"]}
  assert [c["model"] for c in grid["cells"]][0] == "mlp20"  # cheapest first
  assert ("mlp20", "fixup") not in cells and ("resnet32_nobn", "fixup") in cells
  assert ("vgg19_bn", "fixup") not in cells
  models_ = list(dict.fromkeys(c["model"] for c in grid["cells"]))
  assert models_ == ["mlp20", "vit_mini", "resnet32_nobn", "vgg19_nobn", "vgg19_bn"]
  lsuv = "lsuv" in methods.available_methods()
  for model in models_:
    assert ((model, "lsuv") in cells) == lsuv
    assert {"kaiming", "warmup", "metainit", "gradinit", "nio"} <= {
      m for mod, m in cells if mod == model
    }
  seeds = {"mlp20": 5, "resnet32_nobn": 8}
  for (model, method), cell in cells.items():
    cfg = sweep.run_config(cell, 0)
    assert cfg.data.train_subset is None and cfg.data.batch_size == 128
    assert tuple(cfg.eval.steps) == (50, 100, 200) and cfg.eval.subset == 2000
    assert cfg.train.lr == 0.1 and cfg.train.schedule == "constant"
    assert cfg.train.weight_decay == 1e-4 and cfg.train.get("no_norm_recipe") is None
    assert cell["seeds"] == list(range(seeds.get(model, 3)))
    assert cfg.max_steps == (None if model == "mlp20" else 300)
    if method in ("metainit", "gradinit", "nio"):
      assert cfg.init.config.num_steps == 100 and cfg.init.batch_size == 64
    if method == "nio":  # the batch setting (NIOConfig default), also on the BN net
      assert build_method_config(cfg).num_chunks == 4
    if method == "lsuv":  # one real batch; the orthonormal draw follows the run's seed
      assert cfg.init.data == "real" and build_method_config(sweep.run_config(cell, 2)).seed == 2
    if method == "metainit":  # the paper's listing on Gaussian inputs drawn per seed
      assert cfg.init.data == "random"
      mcfg = build_method_config(sweep.run_config(cell, 2))
      assert (mcfg.variant, mcfg.lr, mcfg.seed) == ("sign_momentum", None, 2)
    if method == "warmup":
      assert round(cfg.train.warmup_epochs * 468) == 100
  bn = cells[("vgg19_bn", "gradinit")]["config"]
  assert bn.model.name == "vgg19_bn" and dict(bn.model.kwargs) == {"width_mult": 0.125}
  assert bn.init.recipe == "vgg19_bn" and bn.data.pad_to_32
  assert cells[("vgg19_nobn", "gradinit")]["config"].init.recipe == "vgg19"
  assert cells[("resnet32_nobn", "gradinit")]["config"].init.recipe == "resnet110"
  assert cells[("mlp20", "kaiming")]["config"].model.kwargs.dense_init == "he_normal"
  assert len(cells[("mlp20", "kaiming")]["config"].model.kwargs.hidden) == 19


_COMPILES: list = []


def _count_compiles(name, *_, **__):
  if name == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(name)


def test_later_seeds_of_a_cell_compile_nothing(tmp_path):
  """The second seed of a cell reuses every compiled function of the first (search step,
  GC measurement, train and eval steps, model init): XLA compiles nothing."""
  import jax.monitoring

  from nio_jax import experiment

  _fmnist_or_skip()
  cell = _mini_grid()["cells"][1]  # nio
  experiment.train_run(sweep.run_config(cell, 0), tmp_path / "s0")
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  _COMPILES.clear()
  rec = experiment.train_run(sweep.run_config(cell, 1), tmp_path / "s1")
  assert rec["search_steps"] == 2 and rec["step"] == 6
  assert len(_COMPILES) == 0, f"{len(_COMPILES)} XLA compilations for the second seed"


def test_a_diverged_init_search_is_a_result(tmp_path, monkeypatch):
  """A search that raises `NonFiniteError` (the library stops at the first non-finite
  value) is recorded as "init diverged at step N" with no accuracies, counted among the
  cell's diverged runs, and skipped on a re-run, instead of stopping the sweep."""
  from nio_jax import errors, experiment

  grid = _mini_grid()
  grid["cells"] = [grid["cells"][0]]  # kaiming, seeds 0 and 1

  def train_run(cfg, workdir, progress=None):
    if cfg.seed == 1:
      raise errors.NonFiniteError("metainit: non-finite scales at step 3", step=3)
    return {
      "name": cfg.name,
      "model": cfg.model.name,
      "method": cfg.init.method,
      "seed": int(cfg.seed),
      "status": "finished",
      "finished": True,
      "step": 6,
      "acc_steps": {"2": 0.5, "4": 0.6},
      "acc_epochs": [],
      "final_test_acc": 0.6,
    }

  monkeypatch.setattr(experiment, "train_run", train_run)
  root, res = tmp_path / "runs", tmp_path / "results"
  out = sweep.run_grid(grid, root, res, plots=False, log=lambda *_: None)
  assert out["statuses"] == ["finished", "init diverged at step 3"]
  rec = json.loads((res / "sweep_test_mini/runs/mlp__kaiming__seed1.json").read_text())
  assert rec["finished"] is True and rec["final_test_acc"] is None and rec["acc_steps"] == {}
  assert "non-finite scales" in rec["error"] and rec["quiet"]["verdict"] in ("QUIET", "NOISY")
  row = out["table"]["mlp"]["kaiming"]
  assert row["diverged"] == 1 and row["acc_end"] == (0.6, 0.0, 1)
  assert "| kaiming | 2 (1 diverged) |" in (res / "sweep_test_mini/table.md").read_text()
  again = sweep.run_grid(grid, root, res, plots=False, log=lambda *_: None)
  assert again["statuses"] == ["skipped", "skipped"]
