"""What the CLI's persistent compilation cache saves: one NIO step compiled cold, then again
in a fresh process that finds it in the cache (`nio_jax.compile_cache`, issue 20 item 6).

For each formulation it runs two child processes against one empty cache directory. Each
builds the bench's model and batch (`nio_jax.bench.workloads.build`), lowers and compiles the
library's NIO step (`nio.make_nio_step`) and times its first run and the median of `--reps`
further runs. The first child compiles and writes the cache; the second loads it. The whole
run is one `CpuWindow`: the result file stores the other processes' CPU share and the verdict.

    ../shared/tools/quiet -- python -m benchmarks.compile_cache   # ResNet-20, the defaults
    python -m benchmarks.compile_cache --model resnet20_bn --forms loop/im2col
    python -m benchmarks.compile_cache --forms segments/im2col \
        --xla-flags=--xla_backend_optimization_level=1   # also cold under other XLA flags

Results: `benchmarks/results/compile_cache_<platform><tag>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nio_jax.bench import machine  # noqa: E402

CHILD = """
import json, resource, sys, time
import numpy as np
import jax, jax.numpy as jnp
from nio_jax import compile_cache, scales
from nio_jax.bench import workloads
from nio_jax.methods import nio
model, form, batch, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cache = compile_cache.enable()
spec = workloads.build(model, batch)
params = spec["params"]
jb = {"image": jnp.asarray(spec["x"][:batch]), "label": jnp.asarray(spec["y"][:batch])}
s0, sspec = scales.init_scales(params)
d, r = (None, 0.0) if form.split("/")[0] in ("vmap", "map", "norms") else (4, 0.2)
search = nio.make_nio_step(spec["loss_fn"], sspec, workloads.jax_nio_config(d, r, form))
step, args = search.step, (params, s0, search.init(s0), jb)
jax.block_until_ready(args)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KiB)
t0 = time.perf_counter(); low = step.lower(*args)
t1 = time.perf_counter(); comp = low.compile()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t2 = time.perf_counter(); jax.block_until_ready(comp(*args))
t3 = time.perf_counter()
ts = []
for _ in range(reps):
  t = time.perf_counter(); jax.block_until_ready(comp(*args)); ts.append(time.perf_counter() - t)
rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(cache=cache, lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3),
  first_run_s=round(t3 - t2, 4), step_s=round(float(np.median(ts)), 4),
  rss_after_compile_mb=round(rss1 - rss0, 1), rss_peak_mb=round(rss2 - rss0, 1))))
"""


def child(model: str, form: str, batch: int, reps: int, cache_dir: str, flags: str = "") -> dict:
  env = {**os.environ, "NIO_JAX_COMPILE_CACHE": cache_dir}
  if flags:  # appended: the library's own CPU defaults (nio_jax.xla_defaults) still apply
    env["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run(
    [sys.executable, "-c", CHILD, model, form, str(batch), str(reps)],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def render_markdown(res: dict) -> str:
  env, win = res["environment"], res["window"]
  lines = [
    f"# The persistent compilation cache: a NIO step compiled cold and from the cache "
    f"({env['device']}, jax {env['versions'].get('jax')})",
    "",
    f"Model {res['model']}, batch {res['batch']}, float32; the library's NIO step "
    f"(`nio.make_nio_step`), batch setting D=4 r=0.2 or sample-wise by formulation. Each row: "
    f"two fresh processes on one empty cache directory; `cold` compiles and writes, `cached` "
    f"loads. RSS growth: the process's high-water RSS above its value once the model and "
    f"inputs are built (a cached step skips XLA's compiler memory; empty where not recorded). "
    f"{env['date_utc']}; load average {win.get('load_before')} before, "
    f"{win.get('load_after')} after, {win.get('cores')} cores; "
    f"{machine.verdict_markdown(machine.verdict(win))}.",
    "",
    "| formulation | extra XLA flags | process | lower s | compile s | lower + compile s "
    "| first run s | step s | RSS growth after compile MB | peak RSS growth MB |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["rows"]:
    for which in ("cold", "cached"):
      e = r.get(which)
      if e is None:
        continue
      lines.append(
        f"| {r['form']} | {r.get('flags') or '-'} | {which} | {e['lower_s']} | {e['compile_s']} "
        f"| {round(e['lower_s'] + e['compile_s'], 2)} | {e['first_run_s']} | {e['step_s']} "
        f"| {e.get('rss_after_compile_mb', '')} | {e.get('rss_peak_mb', '')} |"
      )
  lines += ["", f"Command: `{res['command']}`. Generated by `benchmarks/compile_cache.py`."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet20")
  ap.add_argument("--forms", default="segments/im2col,vmap/im2col")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument(
    "--xla-flags",
    action="append",
    default=[],
    help="an extra XLA flag set (--xla-flags='--a=1 --b=2', repeatable): each formulation is "
    "also compiled cold under each",
  )
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  ap.add_argument("--tag", default="", help="suffix of the result file names")
  a = ap.parse_args(argv)
  import jax  # noqa: PLC0415

  from benchmarks.user_loop import environment, write_results  # noqa: PLC0415

  res = {
    "command": "python -m benchmarks.compile_cache "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "model": a.model,
    "batch": a.batch,
    "rows": [],
  }
  with machine.CpuWindow() as w:
    for form in a.forms.split(","):
      for flags in ("", *a.xla_flags):
        with tempfile.TemporaryDirectory() as tmp:
          row = {"form": form, "flags": flags}
          for which in ("cold", "cached") if not flags else ("cold",):
            row[which] = child(a.model, form, a.batch, a.reps, os.path.join(tmp, "xla"), flags)
          print(json.dumps(row), flush=True)
          res["rows"].append(row)
  res["window"] = w.record()
  res["environment"] = environment()
  name = f"compile_cache_{jax.default_backend()}{a.tag}"
  write_results(a.out, name, res, render_markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
