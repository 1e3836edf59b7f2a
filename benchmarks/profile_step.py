"""Where the time of a JAX step goes: a `jax.profiler` trace summed by XLA operation kind.

    python -m benchmarks.profile_step                                   # ResNet-20, B=32
    python -m benchmarks.profile_step --model resnet20_bn --parts train,nio_b --runs 3

For each part (the bench's own step functions, `nio_jax.bench.engine.part_fns`: the training
step, the sample-wise and the batch-setting NIO step, each with the library's default
formulation) the step is compiled and run once, then `--runs` calls are traced with
`jax.profiler.trace(..., create_perfetto_trace=True)`. Every trace event whose name is an
instruction of the compiled HLO module (XLA:CPU runs one "thunk" per instruction of the
entry computation and names its trace event after it) is summed by that instruction's kind:

* `dot` (matmuls, the im2col convolutions among them), `convolution`;
* `fusion:<kind>` for fusions, with `+dot` / `+conv` when the fused computation contains one;
* the opcode otherwise (`copy`, `transpose`, `reduce`, `custom-call`, `while`, ...).

Time inside a `while` loop (a `lax.scan` / `lax.map` body) is reported under the instructions
of the body when the trace names them, and under `while` otherwise. The shares are of the
summed instruction time; `wall` is the traced calls' wall time. Results:
`benchmarks/results/profile_<model>_b<B>_<platform>.{json,md}` with device, versions, XLA_FLAGS
and the load average before and after. Run it through `../shared/tools/quiet`: it is a timing.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import gzip
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

import nio_jax  # noqa: E402, F401  (XLA defaults at import)
from nio_jax.bench import engine  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# `%name = type opcode(...)`, and the header of a computation: `%fused_computation.3 (...`
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_KIND = re.compile(r"kind=k(\w+)")


def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind (see the module docstring) for every instruction of the module."""
  comps: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  comp = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if m and comp is not None:
      comps[comp].append((m.group(1), m.group(2), line))

  def contains(c, seen=()):
    ops = set()
    for _, op, line in comps.get(c, ()):
      ops.add(op)
      for callee in _CALLS.findall(line):
        if callee not in seen:
          ops |= contains(callee, (*seen, callee))
    return ops

  kinds = {}
  for instrs in comps.values():
    for name, op, line in instrs:
      if op == "fusion":
        km = _KIND.search(line)
        cm = _CALLS.search(line)
        inner = contains(cm.group(1)) if cm else set()
        tag = "+dot" if "dot" in inner else "+conv" if "convolution" in inner else ""
        kinds[name] = f"fusion:{km.group(1) if km else '?'}{tag}"
      else:
        kinds[name] = op
  return kinds


def trace_events(trace_dir: str) -> list[dict]:
  """Complete ('X') events of the perfetto trace `jax.profiler.trace` wrote under `trace_dir`."""
  files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
  if not files:
    raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarise(events: list[dict], kinds: dict[str, str]) -> dict:
  """Per-kind seconds and shares of the events that are HLO instructions, plus the top
  instructions and the most frequent unmatched event names (to see what the trace holds)."""
  by_kind: dict[str, float] = collections.Counter()
  by_instr: dict[str, float] = collections.Counter()
  unmatched: dict[str, float] = collections.Counter()
  for e in events:
    name = str(e.get("name", ""))
    base = name.split(":")[0].strip()
    sec = float(e["dur"]) * 1e-6
    if base in kinds:
      by_kind[kinds[base]] += sec
      by_instr[base] += sec
    else:
      unmatched[name] += sec
  total = sum(by_kind.values())
  return {
    "instr_seconds": round(total, 4),
    "by_kind": {
      k: {"s": round(v, 4), "share": round(v / total, 4) if total else None}
      for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
    },
    "top_instructions": [
      {"name": k, "kind": kinds[k], "s": round(v, 4)} for k, v in by_instr.most_common(12)
    ],
    "top_unmatched_events": [{"name": k, "s": round(v, 4)} for k, v in unmatched.most_common(8)],
  }


def profile_part(spec: dict, part: str, runs: int) -> dict:
  forms_sw, forms_b = engine.default_formulations(jax.default_backend(), spec)
  jfns, _ = engine.part_fns(part, spec, forms_sw[:1], forms_b[:1], None)
  label, (fn, args) = next(iter(jfns.items()))
  compiled, info = engine.jax_compile(fn, *args)
  kinds = hlo_kinds(compiled.as_text())
  engine._block(compiled(*args))  # warm-up
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(runs):
        engine._block(compiled(*args))
    wall = time.perf_counter() - t0
    events = trace_events(tmp)
  out = summarise(events, kinds)
  out.update(formulation=label, runs=runs, wall_s=round(wall, 4), **info)
  return out


def render(result: dict) -> str:
  env = result["env"]
  lines = [
    f"# Profile of JAX steps: {result['model']}, B={result['batch']}",
    "",
    f"Command: `{result['command']}`",
    "",
    f"Device: {env['device']}, {env['cores']} cores; jax {env['jax']}, jaxlib {env['jaxlib']}, "
    f"python {env['python']}; float32; XLA_FLAGS `{env['xla_flags']}`. Load average at start "
    f"{env['load_at_start']}, at end {env['load_at_end']}. {result['runs']} traced calls per "
    "part after one warm-up; seconds are summed over the traced calls.",
    "",
  ]
  for part, p in result["parts"].items():
    lines += [
      f"## {part} ({p['formulation']}): wall {p['wall_s']} s, instructions {p['instr_seconds']} s,"
      f" {p.get('gflop', '?')} GFLOP per call",
      "",
      "| kind | s | share |",
      "|---|---|---|",
    ]
    for k, v in p["by_kind"].items():
      if v["share"] is not None and v["share"] >= 0.005:
        lines.append(f"| {k} | {v['s']} | {100 * v['share']:.1f} % |")
    lines += [
      "",
      "Top instructions: "
      + ", ".join(f"{t['name']} ({t['kind']}) {t['s']} s" for t in p["top_instructions"][:6]),
      "",
    ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="resnet20")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--parts", default="train,nio_sw,nio_b")
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--out", default=str(RESULTS))
  a = ap.parse_args(argv)
  parts = [p for p in a.parts.split(",") if p]
  for p in parts:
    if p not in ("train", "nio_sw", "nio_b"):
      ap.error(f"unknown part {p!r}; known: train, nio_sw, nio_b")
  spec = engine.build(a.model, a.batch)
  env = {
    "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.default_backend(),
    "cores": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": __import__("jaxlib").__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "load_at_start": [round(x, 2) for x in os.getloadavg()],
  }
  result = {
    "command": "python -m benchmarks.profile_step "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "model": a.model,
    "batch": a.batch,
    "runs": a.runs,
    "env": env,
    "parts": {},
  }
  for p in parts:
    try:
      result["parts"][p] = profile_part(spec, p, a.runs)
    except engine.PartSkipped as e:
      print(f"[profile] {p}: skipped ({e})")
      continue
    print(f"[profile] {p}: {json.dumps(result['parts'][p]['by_kind'])[:400]}")
  env["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"profile_{a.model}_b{a.batch}_{env['platform']}"
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  stem.with_suffix(".md").write_text(render(result))
  print(f"[profile] wrote {stem}.json / .md")
  return result


if __name__ == "__main__":
  main()
