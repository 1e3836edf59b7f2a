"""End-to-end test of the experiment runner (benchmarks/sweep.py) on real Fashion-MNIST:
a miniature grid (kaiming and NIO x 1 seed x the MLP x a few steps on a tiny subset) produces
the table, the JSON and the plots, and a re-run skips the finished runs."""

import copy
import json
import os
import time

import pytest

from benchmarks import sweep


def _grid():
  g = copy.deepcopy(sweep.GRIDS["mini"])
  g["name"] = "test_mini"
  return g


def test_mini_sweep_end_to_end_and_resume(tmp_path):
  pytest.importorskip("matplotlib")
  try:
    from nio_jax import data

    data.load_fashion_mnist("test")
  except (FileNotFoundError, OSError) as e:  # pragma: no cover - dataset not installed
    pytest.skip(f"Fashion-MNIST not available: {e}")
  grid, root, res = _grid(), tmp_path / "runs", tmp_path / "results"
  t0 = time.perf_counter()
  out = sweep.run_grid(grid, root, res, log=lambda *_: None)
  elapsed = time.perf_counter() - t0
  # < 60 s on an idle 2-core CPU; on a shared machine the budget grows with the load average.
  load = os.getloadavg()[0] / (os.cpu_count() or 1)
  limit = 60.0 * max(1.0, load)
  assert elapsed < limit, f"miniature sweep took {elapsed:.0f}s (limit {limit:.0f}s)"
  assert out["statuses"] == ["finished", "finished"]
  assert not out["missing_runs"]

  md = (res / "sweep_test_mini.md").read_text()
  assert "| kaiming | 1 |" in md and "| nio | 1 |" in md and "Acc_best" in md
  js = json.loads((res / "sweep_test_mini.json").read_text())
  for key in ("protocol", "environment", "table", "runs"):
    assert key in js
  assert js["environment"]["versions"]["jax"]
  row = js["table"]["mlp"]["nio"]
  assert 0.0 <= row["acc_best"][0] <= 1.0 and row["gc_before"][0] is not None
  runs = {r["method"]: r for r in js["runs"]}
  assert runs["nio"]["scales"] and runs["nio"]["search_seconds"] > 0
  assert runs["kaiming"]["acc_steps"]["3"] is not None
  for name in (
    "sweep_test_mini_mlp_curves.png",
    "sweep_test_mini_gc.png",
    "sweep_test_mini_scales.png",
  ):
    assert (res / name).stat().st_size > 1000, name
  wd = root / "test_mini" / "mlp" / "nio" / "seed0"
  for f in (
    "metrics.jsonl",
    "summary.json",
    "sweep_run.json",
    "sweep_init.json",
    "sweep_evals.json",
  ):
    assert (wd / f).exists(), f
  mtime = (wd / "summary.json").stat().st_mtime_ns

  # Re-run: both runs are skipped, nothing is retrained.
  out2 = sweep.run_grid(grid, root, res, plots=False, log=lambda *_: None)
  assert out2["statuses"] == ["skipped", "skipped"]
  assert (wd / "summary.json").stat().st_mtime_ns == mtime
  assert out2["table"]["mlp"]["nio"]["acc_best"] == out["table"]["mlp"]["nio"]["acc_best"]


def test_resume_partial_run(tmp_path):
  """A run interrupted after its early-step evaluation resumes from the trainer's checkpoint."""
  try:
    from nio_jax import data

    data.load_fashion_mnist("test")
  except (FileNotFoundError, OSError) as e:  # pragma: no cover
    pytest.skip(f"Fashion-MNIST not available: {e}")
  grid, root = _grid(), tmp_path / "runs"
  grid["measure_batches"] = 0
  run = [r for r in sweep.expand(grid) if r["method"] == "kaiming"][0]
  wd = sweep.run_dir(root, grid, run)
  # Simulate a crash right after the step-3 evaluation: run only up to it.
  rec = sweep.run_one(grid, run, root, log=lambda *_: None, stop_after_evals=True)
  assert rec["status"] == "partial"
  assert sweep._latest_ckpt(wd) == 3 and not sweep.is_finished(wd)
  rec = sweep.run_one(grid, run, root, log=lambda *_: None)
  assert rec["status"] == "finished" and rec["acc_steps"]["3"] is not None
  assert rec["step"] == 6  # 192 // 32 steps, one epoch
  assert sweep.is_finished(wd)
