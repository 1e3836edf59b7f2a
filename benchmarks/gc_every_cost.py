"""What `train.gc_every` costs: the same training run with the GC measurement off and on.

Runs `configs/fmnist_nio.py` (or `--config`) twice through `nio_jax.experiment.train_run`, the
driver of `nio-jax train`: `train.gc_every=0` and `train.gc_every=N`, each in a fresh
temporary workdir, and reports each run's training seconds (measurements excluded), seconds
per training step, the number of GC measurements and their seconds, and one measurement as
a multiple of a training step. The whole measurement is one `CpuWindow`: the file stores the
other processes' CPU share and the verdict, the command, and the environment with the git
commit.

    ../shared/tools/quiet -- python -m benchmarks.gc_every_cost          # gc_every 0 and 10

Results: `benchmarks/results/gc_every_cost_<platform>.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one_run(config: str, gc_every: int, overrides) -> dict:
  from nio_jax import experiment
  from nio_jax.experiment_config import load_config

  cfg, method_config = load_config(config, [f"train.gc_every={gc_every}", *overrides])
  with tempfile.TemporaryDirectory() as wd:
    rec = experiment.train_run(cfg, wd, progress=False, method_config=method_config)
  n = len(rec["gc_steps"])
  gc_s = float(rec.get("gc_seconds") or 0.0)
  per = gc_s / n if n else 0.0
  return dict(
    gc_every=gc_every,
    steps=rec["step"],
    train_seconds=rec["train_seconds"],
    step_seconds=rec["step_seconds"],
    gc_seconds=gc_s,
    measurements=n,
    seconds_per_measurement=per,
    measurement_in_training_steps=per / rec["step_seconds"] if n else 0.0,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="fmnist_nio")
  p.add_argument("--gc-every", type=int, default=10)
  p.add_argument("--set", action="append", default=[], help="more config overrides")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  a = p.parse_args(argv)
  from nio_jax.bench import machine

  with machine.CpuWindow() as win:
    runs = [one_run(a.config, n, a.set) for n in (0, a.gc_every)]
  cfg_desc = f"{a.config} ({', '.join(a.set) or 'its defaults'})"
  res = dict(
    what=f"cost of train.gc_every on config {cfg_desc}, {runs[0]['steps']} training steps",
    command="python -m benchmarks.gc_every_cost "
    + " ".join(sys.argv[1:] if argv is None else argv),
    environment=machine.environment(),
    window=win.record(),
    runs=runs,
  )
  res["quiet"] = machine.verdict(res["window"])
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "gc_every_cost_cpu.json").write_text(json.dumps(res, indent=1) + "\n")
  print(json.dumps(res["runs"], indent=1), res["quiet"]["verdict"])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
