"""Smoke test of benchmarks/bench.py: MLP, batch 8, one repetition (< 60 s on a free CPU)."""

from __future__ import annotations

import glob
import json
import os

import pytest

pytest.importorskip("torch")


def test_bench_mlp_batch8(tmp_path):
  from benchmarks import bench

  result = bench.main(
    [
      "--models",
      "mlp",
      "--batches",
      "8",
      "--reps",
      "1",
      "--parts",
      "gc,nio_b,train",
      "--out",
      str(tmp_path),
    ]
  )
  files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "bench_*")))
  assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)
  assert any(f.endswith(".png") for f in files)
  data = json.load(open(glob.glob(str(tmp_path / "bench_*.json"))[0]))
  for key in ("jax", "jaxlib", "torch", "flax", "python", "date", "jax_backend", "dtype"):
    assert key in data["env"]
  (row,) = result["rows"]
  assert row["model"] == "mlp" and row["batch"] == 8
  assert not row["flagged"], row["gc_check"]
  assert row["gc_check"]["sample"]["ok"] and row["gc_check"]["batch"]["ok"]
  for part in ("gc", "nio_b", "train"):
    ent = row["parts"][part]
    jax_keys = [k for k in ent if k.startswith("jax[")]
    assert jax_keys and all("median_s" in ent[k] and "compile_s" in ent[k] for k in jax_keys)
    assert "median_s" in ent["torch"]
    assert all("ratio_vs_torch" in ent[k] for k in jax_keys)
  assert "ratio_vs_train_step" in row["parts"]["nio_b"]["torch"]
