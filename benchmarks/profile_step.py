"""Where a step's time goes: a per-operation profile of the JAX step and its PyTorch twin.

    python -m benchmarks.profile_step --model resnet20 --batch 32 --parts train,nio_sw,nio_b

For each part it compiles the library's default formulation of the step (the one
`benchmarks.bench` times), runs it `--reps` times under `jax.profiler.trace`, and sums the
XLA:CPU thunk events (named after the HLO instruction they execute) by kind of instruction:

- `convolution` split into forward and backward (the HLO `op_name` metadata of a transposed,
  i.e. differentiated, convolution contains `transpose(`; XLA's layout passes drop the
  metadata of some gradient convolutions, and one without metadata counts as backward),
- `dot` (matrix products: dense layers and the im2col convolutions),
- fusions, by whether they contain a dot/convolution or are elementwise/reduction fusions,
- the rest by opcode (copy, transpose, reduce, scatter, ...).

Control-flow containers (`while`, `call`, `conditional`) are left out of the sums: their
events include their bodies' events. Then it profiles the PyTorch twin of the same step with
`torch.profiler` and sums self CPU time by aten operator. Each table gives the share of the
summed event time; XLA:CPU may run independent thunks on several threads, so the sum can
exceed the wall time, which is reported beside it.

Results: `benchmarks/results/profile_<model>_b<batch>_cpu.{md,json}`. Run it through
`../shared/tools/quiet` like every timing; the profile shares are only as good as the machine
was idle.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONTAINERS = {"while", "call", "conditional", "async-start", "async-done"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^%?([\w.\-]+)\s.*\{\s*$")


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """`{instruction name: {"opcode", "op_name", "calls"}}` of every instruction in an HLO
  module's text, and for fusions the opcodes inside their fused computation."""
  instrs: dict[str, dict] = {}
  comps: dict[str, set[str]] = collections.defaultdict(set)
  comp = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = _CALLS.search(line)
    instrs[name] = dict(
      opcode=opcode,
      op_name=op_name.group(1) if op_name else "",
      calls=calls.group(1) if calls else None,
    )
    if comp is not None:
      comps[comp].add(opcode)
  for v in instrs.values():
    v["inner"] = sorted(comps.get(v["calls"], ())) if v["calls"] else []
  return instrs


def kind_of(info: dict) -> str | None:
  """The category a thunk's time is summed under, or None for a control-flow container."""
  op = info["opcode"]
  if op in CONTAINERS:
    return None
  # XLA's layout passes drop the metadata of some gradient convolutions; a forward one keeps it.
  backward = not info["op_name"] or "transpose(" in info["op_name"]
  if op == "convolution":
    return "convolution (backward)" if backward else "convolution (forward)"
  if op == "dot":
    return "dot (backward)" if backward else "dot (forward)"
  if op == "fusion":
    inner = set(info["inner"])
    if "convolution" in inner:
      return "fusion with convolution"
    if "dot" in inner:
      return "fusion with dot"
    if inner & {"reduce", "reduce-window", "select-and-scatter"}:
      return "fusion (reduction)"
    return "fusion (elementwise/copy)"
  return op


def trace_events(trace_dir: pathlib.Path) -> list[dict]:
  """The complete ('X') events of the newest perfetto trace under `trace_dir`."""
  files = sorted(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  evs = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in evs if e.get("ph") == "X"]


def summarise(events: list[dict], instrs: dict[str, dict], reps: int) -> dict:
  """Per-kind and per-instruction summed event time (ms per step) of the HLO thunks."""
  by_kind: collections.Counter = collections.Counter()
  by_instr: collections.Counter = collections.Counter()
  unmatched: collections.Counter = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if name.startswith("end: "):
      continue
    ms = float(e.get("dur", 0.0)) / 1e3 / reps
    if name not in instrs:
      if not name.startswith("$"):  # "$..." are Python frames of the host
        unmatched[name] += ms
      continue
    k = kind_of(instrs[name])
    if k is None:
      continue
    by_kind[k] += ms
    by_instr[name] += ms
  total = sum(by_kind.values())
  return dict(
    total_ms=total,
    kinds=[
      dict(kind=k, ms=round(v, 3), share=round(v / total, 4) if total else None)
      for k, v in by_kind.most_common()
    ],
    top=[
      dict(
        instr=n,
        kind=kind_of(instrs[n]),
        ms=round(v, 3),
        share=round(v / total, 4) if total else None,
        op_name=instrs[n]["op_name"][-90:],
      )
      for n, v in by_instr.most_common(12)
    ],
    # runtime events that are not HLO instructions (PjRt, thunk executor, ...): they nest
    # and overlap, so they are listed for reading, not summed into the shares
    other_events=[dict(name=n, ms=round(v, 3)) for n, v in unmatched.most_common(12)],
  )


def profile_jax(fn, args, reps: int) -> dict:
  """Compile, warm up, then profile `reps` calls of a jitted `fn`."""
  import jax

  from nio_jax.bench.timing import block

  compiled = fn.lower(*args).compile()
  block(compiled(*args))
  instrs = hlo_index(compiled.as_text())
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(reps):
        block(compiled(*args))
    wall = (time.perf_counter() - t0) / reps
    events = trace_events(pathlib.Path(d))
  out = summarise(events, instrs, reps)
  out["wall_ms"] = round(wall * 1e3, 3)
  return out


def profile_torch(fn, reps: int) -> dict:
  """Warm up, then profile `reps` calls of a PyTorch step; self CPU time per aten op."""
  import torch

  fn()
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(reps):
      fn()
  wall = (time.perf_counter() - t0) / reps
  rows = [(a.key, a.self_cpu_time_total / 1e3 / reps) for a in prof.key_averages()]
  rows = [r for r in rows if r[1] > 0]
  rows.sort(key=lambda r: -r[1])
  total = sum(v for _, v in rows)
  return dict(
    wall_ms=round(wall * 1e3, 3),
    total_ms=round(total, 3),
    top=[dict(op=k, ms=round(v, 3), share=round(v / total, 4)) for k, v in rows[:12]],
  )


def markdown(res: dict) -> str:
  lines = [
    f"# Per-operation profile: {res['model']} B={res['batch']} ({res['backend']})",
    "",
    f"Command: `{res['command']}`. Versions: {res['versions']}. Load average before/after: "
    f"{res['load_before']} / {res['load_after']}; {res['cores']} cores. "
    "Shares are of the summed event time (XLA:CPU can run independent thunks on several "
    "threads; PyTorch: self CPU time per aten operator).",
    "",
  ]
  for part, p in res["parts"].items():
    j, t = p["jax"], p.get("torch")
    lines += [f"## {part} (JAX formulation: {p['form']})", ""]
    lines += [
      f"JAX wall {j['wall_ms']:.1f} ms/step, summed thunk time {j['total_ms']:.1f} ms"
      + (f"; PyTorch wall {t['wall_ms']:.1f} ms/step" if t else "")
      + ".",
      "",
      "| JAX: kind of instruction | ms/step | share |",
      "|---|---|---|",
    ]
    lines += [f"| {k['kind']} | {k['ms']:.1f} | {100 * k['share']:.1f} % |" for k in j["kinds"]]
    lines += [
      "",
      "| JAX: top instructions | kind | ms/step | share | op_name |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {k['instr']} | {k['kind']} | {k['ms']:.1f} | {100 * k['share']:.1f} % | "
      f"`{k['op_name']}` |"
      for k in j["top"]
    ]
    lines += ["", "| JAX: runtime events (not HLO; nested, not summed) | ms/step |", "|---|---|"]
    lines += [f"| {k['name'][:80]} | {k['ms']:.1f} |" for k in j.get("other_events", [])]
    if t:
      lines += ["", "| PyTorch: aten op (self CPU) | ms/step | share |", "|---|---|---|"]
      lines += [f"| {k['op']} | {k['ms']:.1f} | {100 * k['share']:.1f} % |" for k in t["top"]]
    lines.append("")
  if res.get("quiet"):  # added to the JSON afterwards from `../shared/tools/quiet`'s verdict
    lines.append(f"`../shared/tools/quiet` on this run: `{res['quiet']}`.")
    lines.append("")
  if res.get("window"):  # the run's own CpuWindow (profiles from 2026-12-06 on)
    from nio_jax.bench import machine  # noqa: PLC0415

    lines.append(f"This run: {machine.verdict_markdown(machine.verdict(res['window']))}.")
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> dict:
  import sys

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet20")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--parts", default="train,nio_sw,nio_b")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--form-sw", help="sample-wise 'pullback/conv' (default: the backend's)")
  ap.add_argument("--form-b", help="batch-setting 'pullback/conv' (default: the backend's)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  a = ap.parse_args(argv)

  import jax

  from nio_jax.bench import machine, report, workloads

  backend = jax.default_backend()
  spec = workloads.build(a.model, a.batch)
  forms_sw, forms_b = workloads.default_formulations(backend, spec)
  forms_sw = [a.form_sw] if a.form_sw else forms_sw
  forms_b = [a.form_b] if a.form_b else forms_b
  tctx = None
  if not a.no_torch:
    tdev, _ = workloads.torch_device(backend)
    tctx = workloads.build_torch(spec, tdev) if tdev else None
  res = dict(
    model=a.model,
    batch=a.batch,
    backend=backend,
    command="python -m benchmarks.profile_step " + " ".join(argv or sys.argv[1:]),
    versions={
      k: v
      for k, v in report.environment().items()
      if k in ("python", "jax", "jaxlib", "flax", "torch", "torch_threads", "xla_flags")
    },
    git_commit=machine.git_commit(),
    cores=machine.cores(),
    load_before=machine.load_average(),
    parts={},
  )
  with machine.CpuWindow() as window:
    for part in a.parts.split(","):
      try:
        jfns, torch_fn = workloads.part_fns(part, spec, forms_sw[:1], forms_b[:1], tctx)
      except workloads.PartSkipped as e:
        print(f"[profile] {part}: skipped ({e})", flush=True)
        continue
      form, (fn, args) = next(iter(jfns.items()))
      print(f"[profile] {part} ({form}) ...", flush=True)
      ent = dict(form=form, jax=profile_jax(fn, args, a.reps))
      if torch_fn is not None:
        ent["torch"] = profile_torch(torch_fn, a.reps)
      res["parts"][part] = ent
  res["window"] = window.record()
  res["load_after"] = machine.load_average()
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  chosen = [f.replace("/", "-") for f in (a.form_sw, a.form_b) if f]
  stem = out / "_".join([f"profile_{a.model}_b{a.batch}_{backend}", *chosen])
  stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
  md = markdown(res)
  stem.with_suffix(".md").write_text(md)
  print(md)
  return res


if __name__ == "__main__":
  main()
