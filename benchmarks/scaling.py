"""Scale-out overhead: NIO step (batch setting and sample-wise) and a training step vs the
number of devices of the data-parallel mesh (1, 2, 4, 8).

    python -m benchmarks.scaling                  # CPU: 8 simulated devices, writes results
    python -m benchmarks.scaling --devices 1,2,4,8 --batch 64 --image 32 --width 16 --repeats 5

On CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before
JAX starts) and share the host's cores, so the numbers measure the partitioning overhead
(collectives, per-device launch, resharding), NOT a speedup; on a TPU/GPU host the same script
measures real scaling. Each configuration is also run without a mesh ("none") as the
single-device baseline. Timings: median of ``--repeats`` calls after one warm-up (compile)
call, each call ended with ``block_until_ready``.

Results: ``benchmarks/results/scaling_<platform>.json`` and ``.md`` (device, versions, model,
batch, dtype, per-configuration times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__" and "--no-force" not in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import nio_jax  # noqa: E402
from benchmarks import rerender  # noqa: E402
from nio_jax import distributed, models  # noqa: E402
from nio_jax import scales as scmod
from nio_jax.bench import machine  # noqa: E402
from nio_jax.flax_utils import linen_loss_fn  # noqa: E402
from nio_jax.train import TrainState, build_steps, default_config  # noqa: E402


def timeit(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm-up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)), float(np.min(ts))


def render_markdown(data: dict) -> str:
  """The table of one JSON file (`{"meta", "rows"}`); the .md holds only this."""
  meta, rows = data["meta"], data["rows"]
  whats = list(dict.fromkeys(r["what"] for r in rows))
  devs = list(dict.fromkeys(r["devices"] for r in rows))
  t = {(r["devices"], r["what"]): r["median_s"] for r in rows}
  lines = [
    f"# Data-parallel scaling ({meta['platform']}, {meta['device_kind']})",
    "",
    f"{meta['note']}.",
    "",
    f"Model {meta['model']} ({meta['param_count']} params), batch {meta['batch']} x "
    f"{'x'.join(map(str, meta['input']))}, {meta['dtype']}; jax {meta['jax']}, flax "
    f"{meta['flax']}; host CPUs {meta['host_cpus']} (affinity {meta['cpu_affinity']}); "
    f"{meta['date']}"
    + (
      f"; load average (1, 5, 15 min) {meta['load_at_start']} at start, "
      f"{meta['load_at_end']} at end"
      if "load_at_start" in meta
      else ""
    )
    + f". Median of {meta['repeats']} calls after a warm-up, milliseconds. "
    "`none` = no mesh (plain single-device jit).",
    "",
    "| devices | " + " | ".join(whats) + " |",
    "|---" * (len(whats) + 1) + "|",
  ]
  for d in devs:
    lines.append(f"| {d} | " + " | ".join(f"{1e3 * t[(d, w)]:.1f}" for w in whats) + " |")
  lines += [
    "",
    "Regenerate: `python -m benchmarks.scaling` (re-render: `python -m benchmarks.scaling "
    "--render <json>`); reading: docs/performance.md.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--image", type=int, default=8)
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--width", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument(
    "--no-force", action="store_true", help="do not simulate 8 CPU devices (use the real devices)"
  )
  ap.add_argument("--render", default=None, help="only rewrite the .md of this JSON file")
  args = ap.parse_args(argv)
  if args.render:
    rerender(args.render, render_markdown)
    return
  env = machine.environment(
    " ".join(["python -m benchmarks.scaling", *(argv if argv is not None else sys.argv[1:])])
  )
  counts = [int(c) for c in args.devices.split(",") if int(c) <= jax.device_count()]

  model = models.get("resnet20", depth=args.depth, width=args.width)
  shape = (args.batch, args.image, args.image, 3)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape[1:]))
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=shape), jnp.float32),
    "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32),
  }
  loss_fn = linen_loss_fn(model, batch_stats=variables.get("batch_stats"))
  params = variables["params"]
  s0, spec = scmod.init_scales(params)

  cfg = default_config()
  cfg.batch_size, cfg.progress, cfg.plots = args.batch, False, False
  has_bs = bool(variables.get("batch_stats"))
  steps = build_steps(model, cfg, 100, has_bs, not has_bs)
  train_step = steps.train_step
  state = TrainState.create(variables, steps.tx, 0)
  acc = jnp.zeros((2, 3), jnp.float32)

  rows = []
  for n in [None] + counts:
    mesh = None if n is None else distributed.make_mesh(n)
    put_b = (lambda b: b) if mesh is None else (lambda b: distributed.shard_batch(b, mesh))
    rep = (lambda t: t) if mesh is None else (lambda t: distributed.replicate(t, mesh))
    b = put_b(batch)
    for setting, chunks, r in (("nio_batch_D4", 4, 0.2), ("nio_samplewise", None, 0.0)):
      search = nio_jax.make_nio_step(
        loss_fn, spec, {"num_chunks": chunks, "overlap": r, "lr": 1e-3}, mesh=mesh
      )
      p0, sc = rep((params, s0))
      opt = rep(search.init(s0))
      med, best = timeit(lambda: search.step(p0, sc, opt, b), args.repeats)
      rows.append({"devices": n or "none", "what": setting, "median_s": med, "min_s": best})
      print(rows[-1], flush=True)
    st, ac = rep((state, acc))
    med, best = timeit(lambda: train_step(st, ac, b), args.repeats)
    rows.append({"devices": n or "none", "what": "train_step", "median_s": med, "min_s": best})
    print(rows[-1], flush=True)

  vers = env["versions"]
  meta = {
    "date": env["date_utc"],
    "platform": env["backend"],
    "device_kind": env["device_kind"],
    "device_count": env["device_count"],
    "host_cpus": env["cpu_count"],
    "cpu_affinity": env["cores"],
    "processor": env["processor"],
    "python": env["python"],
    "jax": vers.get("jax"),
    "jaxlib": vers.get("jaxlib"),
    "flax": vers.get("flax"),
    "optax": vers.get("optax"),
    "model": f"resnet20(depth={args.depth}, width={args.width}, BN)",
    "param_count": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
    "batch": args.batch,
    "input": list(shape[1:]),
    "dtype": "float32",
    "repeats": args.repeats,
    "xla_flags": env["xla_flags"],
    "load_at_start": env["load_average_at_start"],
    "load_at_end": machine.load_average(),
    "command": env["command"],
    "git_commit": env["git_commit"],
    "note": (
      "simulated CPU devices share the host cores: this measures the overhead of "
      "data-parallel partitioning, not a speedup"
    )
    if jax.default_backend() == "cpu"
    else "real devices",
  }
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"scaling_{jax.default_backend()}")
  with open(base + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  text = render_markdown({"meta": meta, "rows": rows})
  with open(base + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
