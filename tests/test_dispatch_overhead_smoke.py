"""Smoke test of benchmarks/dispatch_overhead.py (a few steps; not a timing)."""

from __future__ import annotations

import json

import numpy as np


def test_dispatch_overhead_writes_result(tmp_path):
  from benchmarks import dispatch_overhead

  out = tmp_path / "d.json"
  dispatch_overhead.main(["--steps", "2", "--reps", "1", "--out", str(out)])
  rec = json.loads(out.read_text())
  meta, res = rec["meta"], rec["results"]
  for k in ("device", "jax", "model", "batch", "dtype", "loadavg_at_start", "loadavg_at_end"):
    assert k in meta, k
  assert meta["steps"] == 2 and meta["batch"] == 16
  med = res["median_s"]
  np.testing.assert_allclose(res["host_over_device"], med["host"] / med["device"])
  np.testing.assert_allclose(
    res["overhead_per_step_ms"], 1e3 * (med["host"] - med["device"]) / 2, rtol=1e-9
  )
  md = (tmp_path / "d.md").read_text()
  assert md.count("| host |") == 1
  # the quiet verdict of the compile and timed runs lands in the JSON and the Markdown
  quiet = meta["quiet"]
  assert quiet["verdict"] in ("QUIET", "NOISY", None) and quiet["threshold"] == 0.05
  assert f"other processes' CPU share {quiet['other_cpu_share']}: **" in md
  # a result file written before the verdict was stored still renders
  del meta["quiet"]
  assert "quiet verdict not recorded" in dispatch_overhead.render_markdown(rec)
