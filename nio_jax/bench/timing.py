"""How the benchmark measures: interleaved medians, lower and compile times, XLA's memory and
FLOP figures of a compiled step, and the machine's measured matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nio_jax.bench import machine, require_torch


def now() -> float:
  """The benchmark's clock (`time.perf_counter`), in seconds."""
  return time.perf_counter()


def block(out):
  """`jax.block_until_ready(out)`: waits until a JAX result is computed."""
  import jax

  return jax.block_until_ready(out)


def sync(device) -> None:
  """Waits until PyTorch's queued work on `device` is done (a no-op on the CPU)."""
  if device == "cuda":
    require_torch().cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, budget_s: float):
  """Median seconds of each fn, repetitions interleaved; fewer reps if one rep > budget."""
  times = {k: [] for k in fns}
  for r in range(reps):
    for k, f in fns.items():
      t0 = now()
      f()
      times[k].append(now() - t0)
    if r == 0 and sum(v[0] for v in times.values()) * reps > budget_s and reps > 1:
      reps_left = max(0, int(budget_s // max(sum(v[0] for v in times.values()), 1e-9)) - 1)
      if reps_left < reps - 1:
        for _ in range(reps_left):
          for k, f in fns.items():
            t0 = now()
            f()
            times[k].append(now() - t0)
        break
  return {
    k: dict(median_s=statistics.median(v), reps=len(v), all_s=[round(t, 5) for t in v])
    for k, v in times.items()
  }


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled JAX function by XLA's `cost_analysis()`, or None."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend dependent
    return None
  if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
    ca = ca[0] if ca else None
  flops = (ca or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def jax_compile(fn, *args):
  """(compiled, info) with separate lower / compile times, XLA memory and FLOP counts."""
  t0 = now()
  lowered = fn.lower(*args)
  t1 = now()
  compiled = lowered.compile()
  t2 = now()
  info = dict(lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3))
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      info["xla_temp_mb"] = round(ma.temp_size_in_bytes / 2**20, 2)
      info["xla_argument_mb"] = round(ma.argument_size_in_bytes / 2**20, 2)
      info["xla_output_mb"] = round(ma.output_size_in_bytes / 2**20, 2)
      info["xla_peak_mb"] = round((ma.temp_size_in_bytes + ma.argument_size_in_bytes) / 2**20, 2)
  except Exception as e:  # pragma: no cover - backend dependent
    info["xla_memory"] = f"unavailable: {type(e).__name__}"
  flops = xla_flops(compiled)
  if flops is not None:
    info["gflop"] = round(flops / 1e9, 4)
  return compiled, info


def peak_matmul(n: int, device: str | None, reps: int = 5) -> dict:
  """GFLOP/s of an n x n float32 matmul in JAX and PyTorch, measured now; `peak` is the max."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n)).astype(np.float32)
  b = rng.standard_normal((n, n)).astype(np.float32)
  with machine.CpuWindow() as w:
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul).lower(ja, jb).compile()
    block(mm(ja, jb))
    out = dict(
      n=n,
      dtype="float32",
      jax_gflops=round(machine.matmul_gflops(lambda: block(mm(ja, jb)), n, reps), 1),
    )
    if device is not None:
      torch = require_torch()
      ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)

      def tmm():
        torch.mm(ta, tb)
        sync(device)

      tmm()
      out["torch_gflops"] = round(machine.matmul_gflops(tmm, n, reps), 1)
  out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
  out["machine"] = w.record()
  return out
