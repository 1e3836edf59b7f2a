"""The sweep runner on a miniature grid (checks that it works, not results): every run goes
through `nio_jax.experiment.train_run`; the table, per-run JSON and plots are written; a
re-run skips finished runs; an interrupted run starts afresh. Also: the issue-13 grid's
configs all validate, with the protocol's numbers."""

import json
import shutil

import pytest

from benchmarks import sweep
from nio_jax.config import base_config, method_config


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

  # Re-run: every run is skipped; an unfinished run (no record) starts again from scratch.
  (root / "test_mini/mlp/kaiming/seed1/run_record.json").unlink()
  out2 = sweep.run_grid(grid, root, res, plots=False, log=lambda *_: None)
  assert out2["statuses"] == ["skipped", "finished"] + ["skipped"] * 4
  assert (root / "test_mini/mlp/nio/seed0/run_record.json").stat().st_mtime_ns == mtime
  again = json.loads((root / "test_mini/mlp/kaiming/seed1/run_record.json").read_text())
  assert again["resumed"] is False and again["step"] == 6

  # A fresh clone has the committed per-run JSON but no run directories: collect still
  # builds the whole table from them.
  shutil.rmtree(root)
  col = sweep.collect(grid, root, res, plots=False, log=lambda *_: None)
  assert not col["missing"] and col["table"]["mlp"]["nio"]["seeds"] == [0, 1]
  assert col["table"]["mlp"]["kaiming"]["acc@2"] == out2["table"]["mlp"]["kaiming"]["acc@2"]


def test_fmnist_grid_follows_the_protocol():
  grid = sweep.load_grid("fmnist")
  cells = {(c["model"], c["method"]): c for c in grid["cells"]}
  assert [c["model"] for c in grid["cells"]][0] == "mlp20"  # cheapest first
  assert ("mlp20", "fixup") not in cells and ("resnet32_nobn", "fixup") in cells
  for (model, method), cell in cells.items():
    cfg = sweep.run_config(cell, 0)
    assert cfg.data.train_subset is None and cfg.data.batch_size == 128
    assert tuple(cfg.eval.steps) == (50, 100, 200) and cfg.eval.subset == 2000
    assert cfg.train.lr == 0.1 and cfg.train.schedule == "constant"
    assert len(cell["seeds"]) == (5 if model == "mlp20" else 3)
    assert cfg.max_steps == (None if model == "mlp20" else 300)
    if method in ("metainit", "gradinit", "nio"):
      assert cfg.init.config.num_steps == 100 and cfg.init.batch_size == 64
    if method == "metainit":  # the paper's listing on Gaussian inputs drawn per seed
      assert cfg.init.data == "random"
      mcfg = method_config(sweep.run_config(cell, 2))
      assert (mcfg.variant, mcfg.lr, mcfg.seed) == ("sign_momentum", None, 2)
    if method == "warmup":
      assert round(cfg.train.warmup_epochs * 468) == 100
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
