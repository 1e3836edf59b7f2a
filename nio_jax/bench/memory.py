"""Peak memory of one benchmark part, measured in a fresh Python process.

    python -m nio_jax.bench.memory '{"model": "mlp", "batch": 8, "part": "train",
                                    "framework": "torch", "seed": 0}'

`ru_maxrss` is a high-water mark, so in the benchmark's own process an earlier, larger part
hides a later one (the old figure was 0 whenever that happened). Here each part gets a new
process: it imports both frameworks, builds the model and inputs exactly as the benchmark
does (same seed), records the RSS high-water as the baseline, then

* PyTorch: runs the part once; the peak is the high-water growth over the baseline
  (`torch.cuda.max_memory_allocated` on a GPU instead);
* JAX: compiles, then runs the part once; the growth is recorded after compiling and after
  running. `rss_peak_mb` includes XLA's compiler memory when that is the larger: the
  benchmark's XLA `memory_analysis` (temp + arguments) is the executable's own figure.

The last line of stdout is `NIO_JAX_BENCH_MEMORY <json>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nio_jax.bench import machine, require_torch, workloads

MEMORY_TAG = "NIO_JAX_BENCH_MEMORY "  # prefix of the line a memory subprocess prints


def measure(request: dict) -> dict:
  """Peak memory of one part (see the module docstring).

  Args:
    request: `model`, `batch`, `part`, `framework` ("jax" or "torch"), optional
      `label` (the JAX formulation; default the first), `seed`, `torch_threads`,
      `forms_sw`, `forms_b` and `device` (torch device, default "cpu").

  Returns:
    `baseline_mb` (RSS high-water after imports and inputs) and `rss_peak_mb` (growth
    over it); for JAX also `rss_after_compile_mb` and, on an accelerator, `device_peak_mb`
    (the device allocator's high-water); for PyTorch on a GPU `torch_cuda_peak_mb`.

  Raises:
    ValueError: unknown framework or JAX label.
  """
  import jax

  torch = require_torch()
  if request.get("torch_threads"):
    torch.set_num_threads(int(request["torch_threads"]))
  framework = request["framework"]
  if framework not in ("jax", "torch"):
    raise ValueError(f"framework must be 'jax' or 'torch', got {framework!r}")
  device = request.get("device") or "cpu"
  spec = workloads.build(request["model"], int(request["batch"]), int(request.get("seed", 0)))
  dsw, db = workloads.default_formulations(jax.default_backend(), spec)
  tctx = workloads.build_torch(spec, device) if framework == "torch" else None
  jfns, torch_fn = workloads.part_fns(
    request["part"], spec, request.get("forms_sw") or dsw, request.get("forms_b") or db, tctx
  )
  out = dict(framework=framework, part=request["part"])
  if framework == "torch":
    if device == "cuda":
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      before = torch.cuda.memory_allocated()
    base = machine.maxrss_mb()
    torch_fn()
    if device == "cuda":
      torch.cuda.synchronize()
      out["torch_cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 2)
    out.update(baseline_mb=round(base, 1), rss_peak_mb=round(machine.maxrss_mb() - base, 1))
    return out
  label = request.get("label") or next(iter(jfns))
  if label not in jfns:
    raise ValueError(f"no JAX formulation {label!r} in part {request['part']}: {list(jfns)}")
  fn, args = jfns[label]
  base = machine.maxrss_mb()
  compiled = fn.lower(*args).compile()
  after_compile = machine.maxrss_mb()
  jax.block_until_ready(compiled(*args))
  out.update(
    label=label,
    baseline_mb=round(base, 1),
    rss_after_compile_mb=round(after_compile - base, 1),
    rss_peak_mb=round(machine.maxrss_mb() - base, 1),
  )
  stats = jax.devices()[0].memory_stats()  # accelerators: the device allocator's high-water
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 2)
  return out


def measure_in_subprocess(request: dict, timeout_s: float) -> dict:
  """Peak memory of one part, measured by `measure` in a fresh Python process.

  Args:
    request: what `measure` takes (model, batch, part, framework,
      label, seed, torch_threads).
    timeout_s: seconds before the subprocess is killed.

  Returns:
    The subprocess' figures, or `{"error": ...}`.
  """
  import nio_jax

  root = os.path.dirname(os.path.dirname(os.path.abspath(nio_jax.__file__)))
  env = dict(os.environ)  # the child imports this same copy of nio_jax
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "nio_jax.bench.memory", json.dumps(request)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return dict(error=f"memory subprocess exceeded {timeout_s:.0f} s")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(MEMORY_TAG):
      return json.loads(line[len(MEMORY_TAG) :])
  return dict(error=f"memory subprocess failed (rc {proc.returncode}): {proc.stderr[-300:]}")


def main(argv=None) -> int:
  """Entry point of `python -m nio_jax.bench.memory '<json request>'`."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print("usage: python -m nio_jax.bench.memory '<json request>'", file=sys.stderr)
    return 2
  result = measure(json.loads(argv[0]))
  print(MEMORY_TAG + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
