"""Runs the demo's compare command and writes its result file for the docs.

    python -m benchmarks.demo_record --workdir runs/demo -- nio-jax compare --config ...

`scripts/demo.sh` calls this. It runs the command in a child process inside a
`nio_jax.bench.machine.CpuWindow` (the share of the machine that other processes used,
NOISY above 5 %), then writes `benchmarks/results/demo_cpu.json`: the compare result
(`<workdir>/compare.json`: every method's run record, the per-method and total wall
seconds), the demo's own wall time, the command as typed, the git commit (with
"+uncommitted" when `nio_jax/`, `configs/` or `scripts/` had changes), the quiet verdict and
the environment. `python -m benchmarks.docs_figures` renders the README's demo table,
sentence and `docs/images/demo_compare.png` from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "demo_cpu.json"


def commit() -> str:
  head = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
  ).stdout.strip()
  dirty = subprocess.run(
    ["git", "status", "--porcelain", "nio_jax", "configs", "scripts", "benchmarks/demo_record.py"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  ).stdout.strip()
  return head + ("+uncommitted" if dirty and head else "")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="the compare command's --workdir")
  ap.add_argument("--out", default=str(OUT))
  ap.add_argument("--command-as-typed", default=None, help="the demo command to record")
  ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the compare command")
  a = ap.parse_args(argv)
  cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
  from benchmarks.sweep import environment  # noqa: PLC0415
  from nio_jax.bench import machine  # noqa: PLC0415

  rev = commit()
  t0 = time.perf_counter()
  with machine.CpuWindow() as w:
    rc = subprocess.run(cmd, check=False).returncode
  wall = time.perf_counter() - t0
  if rc != 0:
    print(f"[demo_record] the compare command failed (exit {rc}); no result file", file=sys.stderr)
    return rc
  out = json.loads((pathlib.Path(a.workdir) / "compare.json").read_text())
  env = environment()
  env["git_commit"] = rev
  rec = {
    "what": "bash scripts/demo.sh: " + shlex.join(cmd),
    "command": a.command_as_typed or shlex.join(cmd),
    "commit": rev,
    "quiet": machine.verdict(w.record()),
    "device": f"{env['devices'][0]} ({os.cpu_count()} cores)",
    "environment": env,
    "wall_seconds": round(wall, 1),
    "compare": out,
  }
  path = pathlib.Path(a.out)
  path.write_text(json.dumps(rec, indent=1) + "\n")
  print(
    f"[demo_record] wrote {path} ({rec['quiet']['verdict']}); render the docs with "
    "python -m benchmarks.docs_figures"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
