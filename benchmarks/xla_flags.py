"""XLA:CPU flag sets for the training step: speed, exactness and NaN propagation, in one run.

    python -m benchmarks.xla_flags [--model resnet20] [--batch 32] [--reps 7] [--rounds 3]

XLA reads `XLA_FLAGS` once per process, so each flag set runs in its own subprocess. The
subprocesses are interleaved (round 1: A, B, C; round 2: A, B, C; ...) and each round times
the gradient of the training loss `--reps` times after a warm-up; the figure per flag set is
the median over all rounds. Every flag set also reports:

  * `rel_err`: the largest absolute error of the float32 gradient against float64, relative
    to the largest float64 entry (ResNet ±BN, the same batch);
  * `nan_propagates`: whether a batch of NaN images gives a NaN loss (IEEE semantics). A flag
    set that turns NaN into a finite loss hides divergence from the non-finite checks.

The result goes to `benchmarks/results/xla_flags_<platform>.{json,md}` with device,
versions, model, batch, dtype, the load average before and after, and the other processes'
CPU share (the NOISY rule of `nio_jax.bench.machine`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

FLAG_SETS = {
  "xla (no YNN)": "--xla_cpu_experimental_ynn_fusion_type=",
  "ynn reduce": "--xla_cpu_experimental_ynn_fusion_type=reduce",
  "ynn dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
  "ynn dot,eltwise,reduce": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

_CHILD = r"""
import json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp, optax
jax.config.update("jax_enable_x64", True)
from nio_jax import models
from nio_jax.jaxpr_rewrites import canonical_convs

name, batch, reps, norm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = models.get(name, norm=norm)
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
y = jnp.asarray(rng.integers(0, 10, batch))
v = m.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)

def make(dtype):
  vv = jax.tree.map(lambda a: a.astype(dtype), v)
  def loss(p, xb):
    if "batch_stats" in vv:
      out, _ = m.apply({"params": p, "batch_stats": vv["batch_stats"]}, xb, train=True,
                       mutable=["batch_stats"])
    else:
      out = m.apply({"params": p}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  return vv["params"], jax.jit(canonical_convs(jax.value_and_grad(loss)))

p32, f32 = make(jnp.float32)
p64, f64 = make(jnp.float64)
xb = jnp.asarray(x)
jax.block_until_ready(f32(p32, xb))
times = []
for _ in range(reps):
  t0 = time.perf_counter()
  jax.block_until_ready(f32(p32, xb))
  times.append(time.perf_counter() - t0)
_, g32 = f32(p32, xb)
_, g64 = f64(p64, jnp.asarray(x, jnp.float64))
num = max(float(jnp.max(jnp.abs(a.astype(jnp.float64) - b)))
          for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64)))
den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g64))
nan_loss, _ = f32(p32, jnp.full_like(xb, jnp.nan))
print(json.dumps({"times": times, "rel_err": num / den,
                  "nan_propagates": bool(jnp.isnan(nan_loss))}))
"""


def run_child(flags: str, model: str, batch: int, reps: int, norm: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", NIO_JAX_XLA_DEFAULTS="0")
  out = subprocess.run(
    [sys.executable, "-c", _CHILD, model, str(batch), str(reps), norm],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet20")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--norms", default="none,bn")
  ap.add_argument("--out", default=str(RESULTS))
  a = ap.parse_args(argv)
  from nio_jax.bench import machine, report

  command = "python -m benchmarks.xla_flags " + " ".join(sys.argv[1:] if argv is None else argv)
  env = report.environment(command)
  rows = []
  for norm in a.norms.split(","):
    with machine.CpuWindow() as win:
      acc: dict[str, dict] = {k: {"times": []} for k in FLAG_SETS}
      for _ in range(a.rounds):
        for label, flags in FLAG_SETS.items():
          r = run_child(flags, a.model, a.batch, a.reps, norm)
          acc[label]["times"] += r["times"]
          acc[label].update(rel_err=r["rel_err"], nan_propagates=r["nan_propagates"])
    base = statistics.median(acc["xla (no YNN)"]["times"])
    for label, r in acc.items():
      med = statistics.median(r["times"])
      rows.append(
        dict(
          model=a.model,
          norm=norm,
          batch=a.batch,
          flags=label,
          median_s=med,
          vs_xla=med / base,
          rel_err=r["rel_err"],
          nan_propagates=r["nan_propagates"],
          **win.record(),
        )
      )
      print(json.dumps(rows[-1]), flush=True)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / "xla_flags_cpu"
  stem.with_suffix(".json").write_text(
    json.dumps({"command": command, "env": env, "rows": rows}, indent=1) + "\n"
  )
  lines = [
    f"# XLA:CPU flag sets, gradient of the training loss ({a.model}, B={a.batch}, float32)",
    "",
    "Generated by `python -m benchmarks.xla_flags`; environment in the JSON file.",
    "",
    "| norm | flags | median s | vs XLA | rel. err vs f64 | NaN propagates | load start/end | noisy |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['norm']} | {r['flags']} | {r['median_s']:.4f} | {r['vs_xla']:.2f} | "
      f"{r['rel_err']:.2e} | {r['nan_propagates']} | {r['load_before'][0]:.2f}/"
      f"{r['load_after'][0]:.2f} | {'NOISY' if r['noisy'] else 'quiet'} |"
    )
  stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
