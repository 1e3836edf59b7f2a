"""The registry's models in a user's own training loop: a hand-written `jax.jit` SGD step over
`models.get(name)`, against the library's own step and PyTorch (issue 20, part 1).

For each CIFAR ResNet depth (no BN, batch `--batch`, float32, 32x32x3 synthetic inputs) it
compiles and times one plain step,

    g = jax.grad(loss)(params, x, y); u, o = tx.update(g, o, params); params += u

(optax SGD, lr 0.1, momentum 0.9: the PyTorch twin's `make_train_step`), in four forms:

* `default`: `models.get(f"resnet{depth}", norm="none")` as it comes (`scan_unroll=None`:
  the scan unrolled on XLA:CPU, rolled elsewhere; `nio_jax.models._common.resolve_unroll`);
* `rolled`: the same model with `scan_unroll=1`, the registry's default before issue 20 (a
  while loop over the blocks);
* `unrolled`: `scan=False` (one module per block);
* `library`: the default model's step under `jaxpr_rewrites.canonical_convs`, as the
  library's trainer compiles it;

and the PyTorch twin with the same weights. Steps are timed interleaved (median of `--reps`);
lower and compile times are separate. Ratios are to PyTorch in the same run. The whole run is
one `CpuWindow`: the result file stores the other processes' CPU share and the verdict.

    ../shared/tools/quiet -- python -m benchmarks.user_loop            # depths 20, 56, 110
    python -m benchmarks.user_loop --depths 20 --reps 3 --out /tmp/x   # quick look

Results: `benchmarks/results/user_loop_<platform>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nio_jax import models  # noqa: E402
from nio_jax.bench import machine, timing, workloads  # noqa: E402
from nio_jax.jaxpr_rewrites import canonical_convs, rewrite_convs  # noqa: E402

FORMS = ("default", "rolled", "unrolled", "library")
# opt-in forms (`--forms`): the default model's step with the loss's convolutions rewritten as
# matmuls (`jaxpr_rewrites.rewrite_convs`), the NIO steps' formulations, for the training step
CONV_FORMS = ("im2col", "slices")
ALL_FORMS = FORMS + CONV_FORMS
REPO = pathlib.Path(__file__).resolve().parent.parent


def user_step(model, tx, conv: str | None = None):
  """The step a user writes: plain `jax.grad` of the mean cross-entropy, optax update (with
  `conv`, the loss's convolutions rewritten as `rewrite_convs(loss, conv)` matmuls)."""

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  if conv is not None:
    loss = rewrite_convs(loss, conv)

  def step(params, opt_state, x, y):
    g = jax.grad(loss)(params, x, y)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def has_while(compiled) -> bool:
  """Whether the compiled step still holds a while loop (the rolled scan)."""
  try:
    return bool(re.search(r"\bwhile\(", compiled.as_text()))  # an HLO while instruction
  except Exception:  # pragma: no cover - backend dependent
    return False


def build_spec(depth: int, batch: int, seed: int = 0) -> dict:
  """The default model at `depth`, its variables and a synthetic batch, in the layout
  `nio_jax.bench.workloads.build_torch` takes (a registry name, else `resnet20` with
  `depth=`, e.g. ResNet-8 for the tests)."""
  name = f"resnet{depth}"
  reg, kw = (name, {"norm": "none"}) if name in models.names() else ("resnet20", {})
  kw = {"norm": "none", **({} if reg == name else {"depth": depth})}
  model = models.get(reg, **kw)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * batch, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=(2 * batch,)).astype(np.int32)
  variables = model.init(jax.random.key(seed), jnp.asarray(x[:2]))
  return dict(name=name, reg=reg, kw=kw, model=model, variables=variables, x=x, y=y, batch=batch)


def row(depth: int, batch: int, reps: int, budget_s: float, torch_on: bool, forms=FORMS) -> dict:
  """Compile and step times of the `forms` (and PyTorch) at one depth, with XLA's temporary
  buffer and the page faults per step."""
  spec = build_spec(depth, batch)
  name, reg, kw = spec["name"], spec["reg"], spec["kw"]
  params = spec["variables"]["params"]
  x, y = jnp.asarray(spec["x"][:batch]), jnp.asarray(spec["y"][:batch])
  tx = optax.sgd(0.1, momentum=0.9)
  built = {
    "default": (spec["model"], params),
    "rolled": (models.get(reg, **kw, scan_unroll=1), params),
    "unrolled": (
      models.get(reg, **kw, scan=False),
      models.unstack_blocks({"params": params})["params"],
    ),
  }
  out: dict = {"model": name, "batch": batch, "forms": {}}
  fns = {}
  for form in forms:
    model, p = built["default" if form in ("library", *CONV_FORMS) else form]
    step = user_step(model, tx, form if form in CONV_FORMS else None)
    if form == "library":
      step = canonical_convs(step)
    args = (p, tx.init(p), x, y)
    compiled, info = timing.jax_compile(jax.jit(step), *args)
    info["while_loop"] = has_while(compiled)
    timing.block(compiled(*args))  # the first call (allocations) is not timed
    fns[form] = lambda c=compiled, a=args: timing.block(c(*a))
    info["faults_per_step"] = machine.minor_faults_per_call(fns[form])
    out["forms"][form] = info
  if torch_on:
    tctx = workloads.build_torch(spec, "cpu")
    tstep = tctx["TA"].make_train_step(tctx["model"], 0.1)
    tstep(tctx["x"], tctx["y"])
    fns["torch"] = lambda: tstep(tctx["x"], tctx["y"])
    out["forms"]["torch"] = {"faults_per_step": machine.minor_faults_per_call(fns["torch"])}
  times = timing.interleaved(fns, reps, budget_s)
  for k, t in times.items():
    ent = out["forms"].setdefault(k, {})
    ent["step_ms"] = round(t["median_s"] * 1e3, 2)
    ent["reps"] = t["reps"]
  if "torch" in times:
    tms = times["torch"]["median_s"]
    for form in forms:
      out["forms"][form]["vs_torch"] = round(times[form]["median_s"] / tms, 3)
  return out


def render_markdown(res: dict) -> str:
  env, win = res["environment"], res["window"]
  lines = [
    f"# A user's own training loop over the registry's ResNets ({env['device']}, "
    f"jax {env['versions'].get('jax')}, flax {env['versions'].get('flax')}, "
    f"torch {env['versions'].get('torch', '-')})",
    "",
    f"Hand-written `jax.jit` SGD step (optax, lr 0.1, momentum 0.9) over "
    f"`models.get('resnet<depth>', norm='none')`, batch {res['batch']}, float32, synthetic "
    f"32x32x3 inputs; PyTorch twin with the same weights. {env['date_utc']}; load average "
    f"{win.get('load_before')} before, {win.get('load_after')} after, {win.get('cores')} "
    f"cores; {machine.verdict_markdown(machine.verdict(win))}.",
    "",
    "| model | form | while loop | lower s | compile s | step ms | / PyTorch | XLA temp MiB "
    "| page faults per step |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["rows"]:
    for form in (*ALL_FORMS, "torch"):
      e = r["forms"].get(form)
      if not e:
        continue
      wl = "" if form == "torch" else ("yes" if e.get("while_loop") else "no")
      lines.append(
        f"| {r['model']} | {form} | {wl} | {e.get('lower_s', '')} | {e.get('compile_s', '')} "
        f"| {e.get('step_ms', '')} | {e.get('vs_torch', '')} | {e.get('xla_temp_mb', '')} "
        f"| {e.get('faults_per_step', '')} |"
      )
  lines += depth_table(res)
  lines += [
    "",
    "`default` is the registry's model as it comes; `rolled` is `scan_unroll=1` (the default "
    "before issue 20); `unrolled` is `scan=False`; `library` is the default model's step "
    "under `jaxpr_rewrites.canonical_convs`, as the library's trainer compiles it; `im2col` "
    "and `slices` (where run) are the default model's step with the loss's convolutions as "
    "matmuls (`jaxpr_rewrites.rewrite_convs`).",
    "",
    f"Command: `{res['command']}`. Generated by `benchmarks/user_loop.py`.",
  ]
  return "\n".join(lines) + "\n"


def blocks(model: str) -> int:
  """Residual blocks of a CIFAR ResNet (`resnet<6n+2>`: 3 stages of n)."""
  return (int(model.removeprefix("resnet")) - 2) // 2


def depth_table(res: dict) -> list[str]:
  """Step time against depth, each as a multiple of the first row's (where there are two
  depths or more): linear cost in depth means the two multiples are equal."""
  rows = [r for r in res["rows"] if "default" in r["forms"]]
  if len(rows) < 2:
    return []
  first = rows[0]
  b0 = blocks(first["model"])
  out = [
    "",
    f"Depth: each step time as a multiple of {first['model']}'s (linear cost in depth: the "
    "same multiple as the blocks).",
    "",
    "| model | blocks | blocks x | JAX default ms | JAX x | PyTorch ms | PyTorch x |",
    "|---|---|---|---|---|---|---|",
  ]
  j0 = first["forms"]["default"]["step_ms"]
  t0 = first["forms"].get("torch", {}).get("step_ms")
  for r in rows:
    b, j = blocks(r["model"]), r["forms"]["default"]["step_ms"]
    t = r["forms"].get("torch", {}).get("step_ms")
    out.append(
      f"| {r['model']} | {b} | {b / b0:.2f} | {j} | {j / j0:.2f} | {t if t else '–'} | "
      f"{f'{t / t0:.2f}' if t and t0 else '–'} |"
    )
  return out


def environment() -> dict:
  """`nio_jax.bench.machine.environment` (with torch's version; the commit marked
  "+uncommitted" when the timed code had uncommitted changes) and the dtype."""
  env = machine.environment(
    extra_dists=("torch",), dirty_paths=("nio_jax", "benchmarks/user_loop.py")
  )
  env["dtype"] = "float32"
  return env


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--depths", default="20,56,110", help="CIFAR ResNet depths (6n+2)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--budget", type=float, default=60.0, help="seconds of timing per depth")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {ALL_FORMS}")
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  ap.add_argument("--tag", default="", help="suffix of the result files' names")
  a = ap.parse_args(argv)
  depths = [int(d) for d in a.depths.split(",") if d]
  forms = tuple(f for f in a.forms.split(",") if f)
  if not forms or set(forms) - set(ALL_FORMS):
    ap.error(f"--forms {a.forms!r}: choose from {', '.join(ALL_FORMS)}")
  torch_on = not a.no_torch
  if torch_on:
    try:
      import torch  # noqa: F401, PLC0415
    except ImportError:
      print("torch not installed: PyTorch column skipped", file=sys.stderr)
      torch_on = False
  res = {
    "command": "python -m benchmarks.user_loop "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "batch": a.batch,
    "rows": [],
  }
  with machine.CpuWindow() as w:
    for d in depths:
      r = row(d, a.batch, a.reps, a.budget, torch_on, forms)
      print(json.dumps(r), flush=True)
      res["rows"].append(r)
  res["window"] = w.record()
  res["environment"] = environment()
  write_results(a.out, f"user_loop_{jax.default_backend()}{a.tag}", res, render_markdown(res))
  return 0


def write_results(out_dir, name: str, res: dict, md: str) -> None:
  """Writes `<out_dir>/<name>.json` (the record) and `.md` (its rendering), and prints the
  rendering (shared by the benchmark scripts that render from their JSON)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / name
  stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
  stem.with_suffix(".md").write_text(md)
  print(md)
  print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
  sys.exit(main())
