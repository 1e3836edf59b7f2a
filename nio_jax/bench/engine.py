"""JAX (nio_jax) vs PyTorch (reference-style baseline) on the same model, batch and weights.

    nio-jax bench --models resnet20,resnet20_bn --batches 32 --reps 3
    python -m benchmarks.bench ...      (source checkout: the same `main`, results in
                                         benchmarks/results/)

For every (model, batch) row it builds the Flax model from `nio_jax.models`, loads the same
weights into the PyTorch twin (`nio_jax.bench.torch_baseline.models`), checks that both
frameworks compute the same GradCosine (1e-3 relative; a row that disagrees is flagged), then
times, with JAX and PyTorch repetitions interleaved in the same run (medians):

  pe        per-example gradients (sample-wise)
  gc        the GradCosine value (sample-wise)
  nio_sw    one full NIO step, sample-wise GradCosine
  nio_b     one full NIO step, batch setting D=4, r=0.2 (the released default)
  gradinit  one GradInit step (SGD variant, η=0.1)
  metainit  one MetaInit step (sign-momentum variant: gradient quotient, double backward)
  train     one plain training step (forward + backward + SGD with momentum)

JAX timings exclude compilation; lower and compile times are recorded separately, with XLA's
`memory_analysis()` (temp + argument bytes) and `cost_analysis()` FLOPs, from which each
step's GFLOP/s and its share of the machine's measured peak (a 2048² float32 matmul, timed in
the same run) follow. Peak memory of both frameworks is measured in a fresh subprocess per
part (`nio_jax.bench.memory`): RSS high-water minus the baseline after imports and inputs.

Every part records the load averages and cores before and after, and the CPU time OTHER
processes used meanwhile (`nio_jax.bench.machine.CpuWindow`); a part where they used more
than 5 % of the machine is marked NOISY: its timings are not results.

Outputs `<out>/bench_<stamp>_<device>.{json,md,png}`.

This module runs the rows; what a row times is in `nio_jax.bench.workloads`, how it is timed
in `nio_jax.bench.timing`, and the report in `nio_jax.bench.report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from typing import Any

import numpy as np

from nio_jax.bench import machine, memory, report, require_torch, timing, workloads

GC_RTOL = 1e-3


class Row:
  """The result of one (model, batch) row: the dict `d` that goes into the JSON."""

  def __init__(self, model, batch):
    self.d: dict[str, Any] = dict(model=model, batch=batch, parts={}, notes=[])

  def note(self, s):
    """Prints and records a note about the row."""
    print("  note:", s, flush=True)
    self.d["notes"].append(s)


def check_gradcosine(row, spec, parts, forms_sw, forms_b, tctx):
  """Both frameworks' GradCosine on the same weights; flags a row that disagrees."""
  import jax.numpy as jnp

  from nio_jax import leaves

  batch = spec["batch"]
  jbatch = {"image": jnp.asarray(spec["x"][:batch]), "label": jnp.asarray(spec["y"][:batch])}
  check = {}
  settings = [("batch", workloads.NIO_B_CHUNKS)] + ([] if spec["has_bn"] else [("sample", None)])
  for sname, d in settings:
    if sname == "sample" and not ({"pe", "gc", "nio_sw"} & set(parts)):
      continue
    if sname == "batch" and "nio_b" not in parts:
      continue
    r = workloads.NIO_B_OVERLAP if d else 0.0
    form = forms_sw[0] if d is None else forms_b[0]
    if spec["has_bn"] and workloads.split_form(form)["pullback"] in workloads.UNCOUPLED_ONLY:
      form = "loop/" + workloads.split_form(form)["conv"]  # refused with batch norm
    wrt = leaves.resolve_grad_filter("default", spec["loss_fn"], spec["params"])
    st = workloads.jax_gradcosine(spec["loss_fn"], spec["params"], jbatch, d, r, wrt, form)
    jgc = float(st.gc)
    ent = dict(jax_gc=jgc, jax_grad_norm=float(st.grad_norm))
    if tctx is not None:
      TA = tctx["TA"]
      tgc, tnorms = TA.gradcosine(
        TA.ScaledModel(tctx["model"]), tctx["x"], tctx["y"], num_chunks=d, overlap=r
      )
      tgc = float(tgc)
      rel = abs(jgc - tgc) / max(abs(tgc), 1e-12)
      ent.update(
        torch_gc=tgc, torch_grad_norm=float(tnorms.mean()), rel_diff=rel, ok=bool(rel <= GC_RTOL)
      )
      if rel > GC_RTOL:
        row.note(f"FLAGGED: {sname} GC differs: jax {jgc:.6g} torch {tgc:.6g} (rel {rel:.2e})")
    check[sname] = ent
    print(f"  check {sname}: {ent}", flush=True)
  row.d["gc_check"] = check
  row.d["flagged"] = any(not e.get("ok", True) for e in check.values())


def time_part(row, part, jfns, torch_fn, tdev, tdev_why, args) -> dict:
  """Compiles, warms up and times one part (JAX and PyTorch interleaved) in a CpuWindow."""
  ent, fns = {}, {}
  with machine.CpuWindow() as window:
    for label, (fn, fargs) in jfns.items():
      key = f"jax[{label}]"
      try:
        compiled, info = timing.jax_compile(fn, *fargs)
        t0 = timing.now()
        timing.block(compiled(*fargs))
        info["first_run_s"] = round(timing.now() - t0, 4)
        ent[key] = info
        print(
          f"    {key} lower {info['lower_s']}s compile {info['compile_s']}s "
          f"first run {info['first_run_s']}s",
          flush=True,
        )
        fns[key] = lambda c=compiled, a=fargs: timing.block(c(*a))
      except Exception as e:
        ent[key] = dict(error=f"{type(e).__name__}: {e}"[:300])
        row.note(f"{part} {key} failed: {type(e).__name__}: {str(e)[:200]}")
    if torch_fn is not None:
      try:
        t0 = timing.now()
        torch_fn()  # warm-up
        timing.sync(tdev)
        ent["torch"] = dict(first_run_s=round(timing.now() - t0, 4))

        def tf():
          torch_fn()
          timing.sync(tdev)

        fns["torch"] = tf
      except Exception as e:
        ent["torch"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        row.note(f"{part} torch failed: {type(e).__name__}: {str(e)[:200]}")
    else:
      ent["torch"] = dict(absent=tdev_why or "no torch twin for this part")
    times = timing.interleaved(fns, args.reps, args.budget)
  ent["machine"] = window.record()
  for k, v in times.items():
    ent[k].update(v)
  if "torch" in times:
    for k in times:
      if k != "torch":
        ent[k]["ratio_vs_torch"] = round(times[k]["median_s"] / times["torch"]["median_s"], 3)
  return ent


def add_memory(ent, row, part, args, tdev):
  """Peak memory of each framework in this part, each in a fresh subprocess."""
  base = dict(model=row.d["model"], batch=row.d["batch"], part=part, seed=args.seed)
  base.update(
    torch_threads=args.torch_threads, forms_sw=row.d["forms_sw"], forms_b=row.d["forms_b"]
  )
  for k, v in ent.items():
    if not (k.startswith("jax[") or k == "torch") or "median_s" not in v:
      continue
    if k == "torch":
      req = dict(base, framework="torch", device=tdev)
    else:
      req = dict(base, framework="jax", label=k[4:-1])
    mem = memory.measure_in_subprocess(req, args.memory_timeout)
    v["memory"] = mem
    if "error" in mem:
      row.note(f"{part} {k} memory: {mem['error']}")


def add_throughput(ent, peak):
  """GFLOP/s of each timed entry (XLA's FLOP count / median time) and its share of `peak`.

  PyTorch has no FLOP count of its own here: its GFLOP/s uses the count of the part's first
  JAX formulation (the same mathematics, counted by XLA).
  """
  jax_keys = [k for k in ent if k.startswith("jax[") and "gflop" in ent[k]]
  for k, v in ent.items():
    if not isinstance(v, dict) or "median_s" not in v:
      continue
    gflop = v.get("gflop") if k != "torch" else (ent[jax_keys[0]]["gflop"] if jax_keys else None)
    if gflop is None:
      continue
    v["gflops"] = round(gflop / v["median_s"], 2)
    if peak:
      v["share_of_peak"] = round(v["gflops"] / peak, 4)


def run_row(name, batch, parts, args, tdev, tdev_why, peak):
  """Checks and times every part of one (model, batch) row."""
  import jax

  row = Row(name, batch)
  spec = workloads.build(name, batch, args.seed)
  row.d["num_params"] = int(
    sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(spec["params"]))
  )
  row.d["has_bn"] = spec["has_bn"]
  if spec["input_scale"] != 1.0:
    row.d["input_scale"] = spec["input_scale"]
    row.note(
      f"inputs scaled by {spec['input_scale']:.3g} so that the logits have unit std at init "
      f"(they exceeded std {workloads.LOGIT_STD_MAX}: saturated softmax, zero per-example "
      "gradients)"
    )
  backend = jax.default_backend()
  forms_sw = workloads.formulations(args.pullback_sw, args.conv_sw, None, backend, spec)
  forms_b = workloads.formulations(
    args.pullback_b, args.conv_b, workloads.NIO_B_CHUNKS, backend, spec
  )
  row.d["forms_sw"], row.d["forms_b"] = forms_sw, forms_b
  uncoupled = [
    f for f in forms_b if workloads.split_form(f)["pullback"] in workloads.UNCOUPLED_ONLY
  ]
  if spec["has_bn"] and uncoupled:
    row.note(f"{', '.join(uncoupled)} not timed: refused with batch norm (not exact)")
  tctx = workloads.build_torch(spec, tdev) if tdev is not None else None
  if tctx is None:
    row.note(f"PyTorch absent: {tdev_why}")
  check_gradcosine(row, spec, parts, forms_sw, forms_b, tctx)
  for part in parts:
    print(f" [{name} B={batch}] {part}", flush=True)
    try:
      jfns, torch_fn = workloads.part_fns(part, spec, forms_sw, forms_b, tctx)
    except workloads.PartSkipped as e:
      row.d["parts"][part] = dict(skipped=str(e))
      continue
    except Exception as e:
      row.note(f"{part} failed: {type(e).__name__}: {str(e)[:300]}")
      traceback.print_exc()
      continue
    ent = time_part(row, part, jfns, torch_fn, tdev, tdev_why, args)
    add_throughput(ent, peak)
    if args.memory:
      add_memory(ent, row, part, args, tdev)
    row.d["parts"][part] = ent
    m = ent["machine"]
    print(
      f"  {part}: "
      + ", ".join(
        f"{k}={v['median_s']:.4f}s"
        + (f" (x{v['ratio_vs_torch']})" if "ratio_vs_torch" in v else "")
        for k, v in ent.items()
        if isinstance(v, dict) and "median_s" in v
      )
      + f"; load {m['load_before']} -> {m['load_after']}, other processes "
      f"{m['other_share']} of the machine{' NOISY' if m['noisy'] else ''}",
      flush=True,
    )
  row.d["noisy"] = any(e.get("machine", {}).get("noisy") for e in row.d["parts"].values())
  # derived ratios: NIO step / training step, within each framework
  tr = row.d["parts"].get("train", {})
  for part in ("nio_sw", "nio_b", "gradinit", "metainit"):
    for k, v in row.d["parts"].get(part, {}).items():
      if isinstance(v, dict) and "median_s" in v:
        base = tr.get("torch" if k == "torch" else "jax[default]", {}).get("median_s")
        if base:
          v["ratio_vs_train_step"] = round(v["median_s"] / base, 2)
  return row.d


def parse(argv, default_out: str = "bench_results"):
  """The command line of `nio-jax bench` (see the module docstring)."""
  ap = argparse.ArgumentParser(prog="nio-jax bench", description=__doc__.split("\n")[0])
  ap.add_argument(
    "--models",
    default="mlp,resnet20",
    help=f"comma list from {','.join(workloads.ALL_MODELS)} or 'all'",
  )
  ap.add_argument("--batches", default="32", help="comma list, e.g. 32,64,128")
  ap.add_argument(
    "--parts", default=",".join(workloads.ALL_PARTS), help=f"comma list of {workloads.ALL_PARTS}"
  )
  for setting, name in (("sw", "sample-wise"), ("b", "batch-setting")):
    ap.add_argument(
      f"--pullback-{setting}",
      default="auto",
      help=f"JAX {name} pullbacks to time (comma list; 'auto' = the library's default)",
    )
    ap.add_argument(
      f"--conv-{setting}",
      default="auto",
      help=f"JAX {name} conv modes (none,slices,im2col,auto); every pullback x conv is timed",
    )
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument(
    "--budget",
    type=float,
    default=120.0,
    help="seconds per part: fewer repetitions if the first one says it won't fit",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--torch-threads",
    type=int,
    default=2,
    help="torch.set_num_threads on CPU (0: leave torch's default)",
  )
  ap.add_argument(
    "--peak-size", type=int, default=2048, help="n of the n x n float32 matmul that sets the peak"
  )
  ap.add_argument(
    "--no-memory",
    dest="memory",
    action="store_false",
    help="skip the per-part peak-memory subprocesses (each re-imports and, for JAX, recompiles)",
  )
  ap.add_argument("--memory-timeout", type=float, default=900.0, help="seconds per subprocess")
  ap.add_argument("--out", default=default_out, help=f"results folder (default {default_out})")
  ap.add_argument("--tag", default="")
  ap.add_argument("--no-plot", action="store_true")
  a = ap.parse_args(argv)
  a.models = (
    list(workloads.ALL_MODELS) if a.models == "all" else [m for m in a.models.split(",") if m]
  )
  a.batches = [int(b) for b in a.batches.split(",") if b]
  a.parts = [p for p in a.parts.split(",") if p]
  from nio_jax import formulation  # noqa: PLC0415  (after --help)

  for key, valid in (
    ("pullback_sw", (*formulation.SAMPLE_PULLBACKS, "auto")),
    ("pullback_b", (*formulation.SUBBATCH_PULLBACKS, "auto")),
    ("conv_sw", (*formulation.CONVS, "auto")),
    ("conv_b", (*formulation.CONVS, "auto")),
  ):
    setattr(a, key, [s for s in getattr(a, key).split(",") if s] or ["auto"])
    for v in getattr(a, key):
      if v not in valid:
        ap.error(f"unknown --{key.replace('_', '-')} {v!r}; valid: {', '.join(valid)}")
  for p in a.parts:
    if p not in workloads.ALL_PARTS:
      ap.error(f"unknown part {p!r}; known: {workloads.ALL_PARTS}")
  for m in a.models:
    if m not in workloads.ALL_MODELS:
      ap.error(f"unknown model {m!r}; known: {workloads.ALL_MODELS}")
  return a


def main(argv=None, default_out: str = "bench_results", prog: str = "nio-jax bench") -> dict:
  """Runs the benchmark and writes its JSON, Markdown and plot.

  Args:
    argv: command-line arguments (default `sys.argv[1:]`).
    default_out: results folder when `--out` is not given.
    prog: how the command was invoked, for the command line recorded in the results.

  Returns:
    The result dict that was written as JSON.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse(argv, default_out)
  torch = require_torch()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  env = report.environment()
  tdev, why = workloads.torch_device(env["jax_backend"])
  env["torch_device"] = tdev or f"absent ({why})"
  result = dict(env=env, command=" ".join([prog, *argv]), rows=[], skipped=[])
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"bench_{stamp}_{env['jax_backend']}{args.tag}")
  grid = [
    f"{m} B={b}"
    for m in workloads.ALL_MODELS
    for b in (32, 64, 128)
    if m not in args.models or b not in args.batches
  ]
  if grid:
    result["skipped"].append(
      "not selected on the command line (time on this device): " + ", ".join(grid)
    )
  result["peak"] = timing.peak_matmul(args.peak_size, tdev)
  print(f"peak: {result['peak']}", flush=True)
  for m in args.models:
    for b in args.batches:
      print(f"== {m} batch {b}", flush=True)
      try:
        result["rows"].append(
          run_row(m, b, args.parts, args, tdev, why, result["peak"]["peak_gflops"])
        )
      except Exception as e:
        traceback.print_exc()
        result["rows"].append(
          dict(
            model=m, batch=b, parts={}, notes=[f"row failed: {type(e).__name__}: {str(e)[:300]}"]
          )
        )
      with open(base + ".json", "w") as f:  # after every row: partial results survive
        json.dump(result, f, indent=1, default=str)
  env["load_at_end"] = machine.load_average()
  with open(base + ".json", "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(base + ".md", "w") as f:
    f.write(report.markdown(result))
  if not args.no_plot:
    try:
      report.plot(result, base + ".png")
    except Exception as e:
      print("plot failed:", e)
  print(report.markdown(result))
  print("wrote", base + ".{json,md,png}")
  return result
