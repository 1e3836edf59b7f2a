"""The cost of JAX's multi-process runtime on this machine: one NIO step on the same 2 CPU
devices as 1 process x 2 devices and as 2 processes x 1 device (issue 32).

Both layouts run the same data-parallel NIO step (`nio_jax.methods.nio.make_nio_step` with
a mesh over 2 devices, sample-wise GradCosine, the batch sharded, params and scales
replicated): with 2 processes the cross-device reductions go through gloo over localhost TCP
instead of XLA:CPU's in-process collectives. Each layout is compiled once and timed
(median of `--reps` steps, each waited for) in fresh child processes; the layouts run one
after the other, never together. The whole run is one `CpuWindow` (children included once
waited for): the result file stores the other processes' CPU share and the quiet verdict.

On CPU this is a correctness-and-overhead check of the multi-process path, not a speed claim:
on a TPU pod or multi-node GPU the collectives run on the interconnect.

    ../shared/tools/quiet -- python -m benchmarks.multiprocess_cost
    python -m benchmarks.multiprocess_cost --reps 3 --batch 8 --out /tmp/x   # quick look

Results: `benchmarks/results/multiprocess_cost_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAYOUTS = (("1x2", 1, 2), ("2x1", 2, 1))  # name, processes, devices per process
TIMEOUT = 900


def child(a) -> int:
  """One process of a layout: joins the others (if any), compiles and times the step;
  process 0 prints one `RESULT {...}` line."""
  import jax  # noqa: PLC0415

  from nio_jax import distributed  # noqa: PLC0415

  if a.num_processes > 1:
    distributed.initialize_multihost(
      coordinator_address=a.coordinator,
      num_processes=a.num_processes,
      process_id=a.process_id,
      initialization_timeout=120,
    )
  import numpy as np  # noqa: PLC0415

  import nio_jax  # noqa: PLC0415
  from nio_jax.methods import nio as nio_mod  # noqa: PLC0415
  from tests import tiny_models as tm  # noqa: PLC0415

  mesh = distributed.make_mesh()
  n, i = jax.process_count(), jax.process_index()
  params = tm.conv_params(jax.random.PRNGKey(0), cin=3, ch=a.channels)
  full = tm.conv_batch(jax.random.PRNGKey(1), b=a.batch, hw=a.hw, cin=3)
  local = {k: np.asarray(v)[i * a.batch // n : (i + 1) * a.batch // n] for k, v in full.items()}
  batch = distributed.shard_batch(local, mesh, global_batch=False)
  cfg = nio_jax.NIOConfig.create({"num_steps": 1})
  scales, spec = nio_jax.init_scales(params)
  search = nio_mod.make_nio_step(tm.conv_loss, spec, cfg, mesh=mesh)
  step = search.step
  params_r, scales_r = distributed.replicate((params, scales), mesh)
  state = search.init(scales_r)
  t = time.perf_counter()
  out = step(params_r, scales_r, state, batch)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(a.reps):
    t = time.perf_counter()
    jax.block_until_ready(step(params_r, scales_r, state, batch))
    times.append(time.perf_counter() - t)
  gc = float(distributed.to_host(out[2]["gc"]))
  if i == 0:
    rec = {
      "first_call_s": round(compile_s, 3),
      "step_ms_median": round(1e3 * float(np.median(times)), 3),
      "step_ms_min": round(1e3 * float(np.min(times)), 3),
      "reps": a.reps,
      "gc": gc,
      "devices": jax.device_count(),
      "processes": n,
    }
    print("RESULT " + json.dumps(rec), flush=True)
  return 0


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_layout(name: str, procs: int, devs: int, a) -> dict:
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devs}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(REPO),
  )
  port = free_port()
  common = ["--batch", a.batch, "--hw", a.hw, "--channels", a.channels, "--reps", a.reps]
  ps = []
  for i in range(procs):
    cmd = [sys.executable, "-m", "benchmarks.multiprocess_cost", "--child", *map(str, common)]
    cmd += ["--num-processes", str(procs), "--process-id", str(i)]
    cmd += ["--coordinator", f"localhost:{port}"]
    ps.append(
      subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )
  outs = []
  for p in ps:
    try:
      out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in ps:
        q.kill()
      raise
    if p.returncode:
      raise RuntimeError(f"layout {name}: a child failed ({p.returncode}):\n{err.decode()[-3000:]}")
    outs.append(out.decode())
  line = next(x for x in outs[0].splitlines() if x.startswith("RESULT "))
  return {"layout": name, "processes": procs, "devices_per_process": devs, **json.loads(line[7:])}


def render_markdown(res: dict) -> str:
  from nio_jax.bench import machine  # noqa: PLC0415

  env, rows = res["environment"], res["rows"]
  base = next(r for r in rows if r["layout"] == "1x2")
  lines = [
    "# Multi-process cost: one NIO step, 1 process x 2 devices vs 2 processes x 1 device",
    "",
    f"`{res['command']}`, commit {env['git_commit']}, {env['date_utc']}; "
    f"{env['device']}, jax {env['versions'].get('jax')}, {env['dtype']}; "
    f"{machine.verdict_markdown(res.get('quiet'))}; load "
    f"{res['window'].get('load_before')} -> {res['window'].get('load_after')}.",
    "",
    f"Model: {res['model']}; batch {res['batch']} (global), sample-wise NIO step "
    "(GradCosine over per-example gradients, shard_map over the `data` axis).",
    "",
    "| layout | processes x devices | first call (s) | step median (ms) | step min (ms) "
    "| vs 1x2 | GC |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ratio = r["step_ms_median"] / base["step_ms_median"]
    lines.append(
      f"| {r['layout']} | {r['processes']} x {r['devices_per_process']} | {r['first_call_s']} "
      f"| {r['step_ms_median']} | {r['step_ms_min']} | {ratio:.2f}x | {r['gc']:.6g} |"
    )
  lines += [
    "",
    "Same GC in both rows: the layouts compute the same step. On CPU the 2-process layout "
    "pays gloo's localhost TCP collectives and one more interpreter; a correctness and "
    "overhead check, not a speed claim for accelerators.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32, help="global batch (even)")
  ap.add_argument("--hw", type=int, default=16, help="image side")
  ap.add_argument("--channels", type=int, default=16)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--coordinator", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    return child(a)

  from benchmarks.user_loop import environment, write_results  # noqa: PLC0415
  from nio_jax.bench import machine  # noqa: PLC0415

  res = {
    "command": "python -m benchmarks.multiprocess_cost "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "model": f"tests.tiny_models conv net (2 conv 3x3, {a.channels} channels, {a.hw}x{a.hw}x3)",
    "batch": a.batch,
    "rows": [],
  }
  with machine.CpuWindow() as w:
    for name, procs, devs in LAYOUTS:
      r = run_layout(name, procs, devs, a)
      print(json.dumps(r), flush=True)
      res["rows"].append(r)
  res["window"] = w.record()
  res["quiet"] = machine.verdict(res["window"])
  res["environment"] = environment()
  res["environment"]["load_average_at_end"] = machine.load_average()
  write_results(a.out, "multiprocess_cost_cpu", res, render_markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
