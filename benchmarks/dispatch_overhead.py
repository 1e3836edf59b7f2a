"""Per-step dispatch overhead of the scale search: host loop vs device loop.

The host loop (`run_scale_search`) calls the jitted step once per step and reads its metrics
back for the safety checks; the device loop (`on_device=True`, `NIOConfig(device_loop=True)`)
runs all steps in one compiled `lax.scan`. On a small model the step itself is cheap, so the
difference per step is the overhead the device loop removes (dispatch, transfers, host checks).

    python -m benchmarks.dispatch_overhead                    # defaults: mlp, B=16, 200 steps
    python -m benchmarks.dispatch_overhead --model cnn_small --steps 500 --reps 5

Both loops are compiled first (one untimed run each); then `--reps` interleaved timed runs of
each; medians are reported. The compile and timed runs are one
`nio_jax.bench.machine.CpuWindow`: the result file stores the other processes' CPU share and
the quiet verdict (`meta["quiet"]`, NOISY above 5 %). Results:
`benchmarks/results/dispatch_overhead_<platform>.json` and `.md`, with the device, versions,
model, batch, dtype and the load average before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


import nio_jax  # noqa: E402
from nio_jax import models, scales  # noqa: E402
from nio_jax.bench import machine  # noqa: E402
from nio_jax.flax_utils import linen_loss_fn  # noqa: E402
from nio_jax.search import run_scale_search  # noqa: E402

SMALL = {"mlp": dict(hidden=(64,)), "cnn_small": dict(channels=(8, 16), hidden=32)}


def build(name: str, batch: int, dtype, num_batches: int = 4):
  model = models.get(name, **SMALL.get(name, {}))
  shape = models.input_shape(name)
  key = jax.random.key(0)
  x = jnp.zeros((batch, *shape), dtype)
  params = model.init(key, x)["params"]
  data = [
    {
      "image": jax.random.normal(jax.random.key(i + 1), (batch, *shape), dtype),
      "label": jax.random.randint(jax.random.key(100 + i), (batch,), 0, 10),
    }
    for i in range(num_batches)
  ]
  return linen_loss_fn(model), params, data


def render_markdown(data: dict) -> str:
  """The .md of one result JSON (`{"meta", "results"}`); "quiet verdict not recorded" for a
  file written before the verdict was stored."""
  meta, res = data["meta"], data["results"]
  med, per_step = res["median_s"], res["per_step_ms"]
  chunks = meta["num_chunks"]
  return (
    f"# Search loop dispatch overhead ({meta['device']}, jax {meta['jax']})\n\n"
    f"NIO step, {meta['model']} {SMALL[meta['model']]}, batch {meta['batch']}, {meta['dtype']}, "
    f"{'sample-wise' if chunks is None else f'batch setting D={chunks}'}, "
    f"{meta['steps']} steps, median of {meta['reps']}. Load average "
    f"{meta['loadavg_at_start'][0]:.2f} -> {meta['loadavg_at_end'][0]:.2f} on "
    f"{meta['cpu_count']} cores; {machine.verdict_markdown(meta.get('quiet'))}.\n\n"
    "| loop | total s | per step ms |\n|---|---|---|\n"
    f"| host | {med['host']:.3f} | {per_step['host']:.3f} |\n"
    f"| device (`lax.scan`) | {med['device']:.3f} | {per_step['device']:.3f} |\n\n"
    f"Overhead removed: {res['overhead_per_step_ms']:.3f} ms per step "
    f"(host / device = {res['host_over_device']:.2f}).\n"
  )


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="mlp", choices=sorted(SMALL))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--num-chunks", type=int, default=4, help="0 = sample-wise setting")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  out = args.out or os.path.join(
    os.path.dirname(__file__), "results", f"dispatch_overhead_{dev.platform}.json"
  )
  num_chunks = args.num_chunks or None
  cfg = nio_jax.NIOConfig.create(
    num_steps=args.steps, num_chunks=num_chunks, overlap=0.2 if num_chunks else 0.0
  )
  loss_fn, params, data = build(args.model, args.batch, dtype)
  sc, spec = scales.init_scales(params)
  search = nio_jax.make_nio_step(loss_fn, spec, cfg)
  env = machine.environment(
    " ".join(
      ["python -m benchmarks.dispatch_overhead", *(argv if argv is not None else sys.argv[1:])]
    )
  )
  meta = dict(
    device=env["device"],
    cpu_count=env["cpu_count"],
    loadavg_at_start=env["load_average_at_start"],
    jax=env["versions"].get("jax"),
    flax=env["versions"].get("flax"),
    python=env["python"],
    model=args.model,
    model_kwargs=SMALL[args.model],
    batch=args.batch,
    dtype=str(dtype),
    steps=args.steps,
    num_chunks=num_chunks,
    reps=args.reps,
    date=env["date_utc"],
    command=env["command"],
    git_commit=env["git_commit"],
    environment=env,
  )

  def run(on_device: bool) -> float:
    t0 = time.perf_counter()
    r = run_scale_search(
      search.step,
      params,
      sc,
      search.init(sc),
      data,
      num_steps=args.steps,
      method="nio",
      config={},
      num_chunks=num_chunks,
      on_device=on_device,
    )
    jax.block_until_ready(r.scales)
    return time.perf_counter() - t0

  with machine.CpuWindow() as window:
    t_compile = {"host": run(False), "device": run(True)}  # compile + first run
    times = {"host": [], "device": []}
    for _ in range(args.reps):
      times["host"].append(run(False))
      times["device"].append(run(True))
  meta["quiet"] = machine.verdict(window.record())
  med = {k: float(np.median(v)) for k, v in times.items()}
  res = dict(
    first_run_s=t_compile,
    times_s=times,
    median_s=med,
    per_step_ms={k: 1e3 * v / args.steps for k, v in med.items()},
    overhead_per_step_ms=1e3 * (med["host"] - med["device"]) / args.steps,
    host_over_device=med["host"] / med["device"],
  )
  meta["loadavg_at_end"] = machine.load_average()
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(meta=meta, results=res), f, indent=1)
  md = out[: -len(".json")] + ".md"
  with open(md, "w") as f:
    f.write(render_markdown(dict(meta=meta, results=res)))
  print(json.dumps(res, indent=1))
  print("wrote", out, md)


if __name__ == "__main__":
  main()
