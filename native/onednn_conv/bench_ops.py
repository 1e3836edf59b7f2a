"""Issue 30's prototype measurement: oneDNN's three convolution operations against XLA's at
ResNet-20's shapes, and the training step they would give.

For each batch (default 32 and 128) and each distinct convolution of the zoo's ResNet-20
(no BN; `nio_jax/models/cifar_resnet.py`), it times, interleaved, medians of `--reps` after
`--warmup` calls:

* XLA: `jax.jit` of `lax.conv_general_dilated` (forward), and of the two halves of its VJP
  (input gradient with respect to x, weight gradient with respect to w; the forward is dead
  code in each and XLA drops it);
* oneDNN: `jax.jit` of the three FFI calls of `onednn_conv.py` (forward, backward-data,
  backward-weights).

It sums them over one training step's convolutions (forward + input gradient + weight
gradient per layer, no input gradient for the stem, which sees the data), times the step
itself (a user's `jax.jit` step, `benchmarks/user_loop.py`'s `default` form: `jax.grad` of
the cross-entropy plus an optax SGD-momentum update, over `models.get("resnet20",
norm="none")`) and PyTorch's twin with the same weights, and estimates

    step with oneDNN ~= XLA step - XLA's conv sum + oneDNN's conv sum

(an estimate: it assumes the rest of the step keeps its time once the convolutions become
custom calls, which also stop XLA from fusing into or around them).

The whole run is one `CpuWindow` (the other processes' CPU share and the QUIET / NOISY
verdict, as `benchmarks/user_loop.py`). Run it through the quiet tool:

    ../shared/tools/quiet -- python native/onednn_conv/bench_ops.py
    python native/onednn_conv/bench_ops.py --batches 2 --reps 2 --warmup 1 --out /tmp/x  # check

Results: `benchmarks/results/onednn_prototype_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onednn_conv as oc  # noqa: E402
import optax  # noqa: E402

import nio_jax  # noqa: E402, F401  (sets the library's XLA flags before any compilation)
from benchmarks import user_loop  # noqa: E402
from nio_jax.bench import machine, timing, workloads  # noqa: E402

OPS = ("fwd", "bwd_data", "bwd_weights")

# ResNet-20 (no BN): (name, H=W of the input, C_in, C_out, stride, layers, needs input grad).
# 3x3 kernels, padding 1 everywhere; the down-sampling shortcuts hold no convolution.
RESNET20_CONVS = (
  ("stem 3->16 @32", 32, 3, 16, 1, 1, False),
  ("16->16 @32", 32, 16, 16, 1, 6, True),
  ("16->32 s2 @32->16", 32, 16, 32, 2, 1, True),
  ("32->32 @16", 16, 32, 32, 1, 5, True),
  ("32->64 s2 @16->8", 16, 32, 64, 2, 1, True),
  ("64->64 @8", 8, 64, 64, 1, 5, True),
)
PAD = ((1, 1), (1, 1))


def op_fns(batch: int, hw: int, cin: int, cout: int, stride: int, seed: int = 0) -> dict:
  """The six jitted calls (XLA and oneDNN, three ops each) at one shape, with their inputs."""
  rng = np.random.default_rng(seed)
  xs, ws = (batch, hw, hw, cin), (3, 3, cin, cout)
  kw = dict(stride=(stride, stride), padding=PAD, dilation=(1, 1), groups=1)
  ys = oc.out_shape(xs, ws, oc._config(**kw))
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(ws) * 0.1, jnp.float32)
  dy = jnp.asarray(rng.standard_normal(ys), jnp.float32)

  def ref(x, w):
    return oc.reference_conv(x, w, **kw)

  zeros_x, zeros_w = jnp.zeros(xs, jnp.float32), jnp.zeros(ws, jnp.float32)
  fns = {
    ("xla", "fwd"): (jax.jit(ref), (x, w)),
    ("xla", "bwd_data"): (
      jax.jit(lambda dy, w: jax.vjp(lambda x: ref(x, w), zeros_x)[1](dy)[0]),
      (dy, w),
    ),
    ("xla", "bwd_weights"): (
      jax.jit(lambda x, dy: jax.vjp(lambda w: ref(x, w), zeros_w)[1](dy)[0]),
      (x, dy),
    ),
    ("onednn", "fwd"): (jax.jit(lambda x, w: oc.conv(x, w, **kw)), (x, w)),
    ("onednn", "bwd_data"): (jax.jit(lambda dy, w: oc.conv_bwd_data(dy, w, xs, **kw)), (dy, w)),
    ("onednn", "bwd_weights"): (
      jax.jit(lambda x, dy: oc.conv_bwd_weights(x, dy, ws, **kw)),
      (x, dy),
    ),
  }
  return fns


def time_shape(batch, conv, reps: int, warmup: int, budget_s: float) -> dict:
  name, hw, cin, cout, stride, layers, needs_dx = conv
  fns = op_fns(batch, hw, cin, cout, stride)
  calls = {}
  for key, (f, args) in fns.items():
    for _ in range(max(1, warmup)):  # the first call compiles
      timing.block(f(*args))
    calls["/".join(key)] = lambda f=f, a=args: timing.block(f(*a))
  small = jnp.ones((8,), jnp.float32)
  noop = jax.jit(lambda a: a + 1.0)
  timing.block(noop(small))
  calls["dispatch"] = lambda: timing.block(noop(small))  # a jitted call's floor
  t = timing.interleaved(calls, reps, budget_s)
  row = dict(
    name=name,
    batch=batch,
    hw=hw,
    cin=cin,
    cout=cout,
    stride=stride,
    layers=layers,
    needs_input_grad=needs_dx,
    ms={},
    reps={},
  )
  for k, v in t.items():
    row["ms"][k] = round(v["median_s"] * 1e3, 4)
    row["reps"][k] = v["reps"]
  return row


def step_sum(rows, impl: str, net: bool = False) -> float:
  """Milliseconds of one training step's convolutions with `impl` (sum over the layers);
  `net`: less a jitted call's floor (the `dispatch` column) per call, as inside a step."""
  tot = 0.0
  for r in rows:
    ops = OPS if r["needs_input_grad"] else ("fwd", "bwd_weights")
    floor = r["ms"]["dispatch"] if net else 0.0
    tot += r["layers"] * sum(r["ms"][f"{impl}/{op}"] - floor for op in ops)
  return tot


def time_steps(batch: int, reps: int, budget_s: float, torch_on: bool) -> dict:
  """A user's jitted ResNet-20 step (`user_loop`'s `default` form) and PyTorch's twin."""
  spec = user_loop.build_spec(20, batch)
  params = spec["variables"]["params"]
  x, y = jnp.asarray(spec["x"][:batch]), jnp.asarray(spec["y"][:batch])
  tx = optax.sgd(0.1, momentum=0.9)
  step = user_loop.user_step(spec["model"], tx)
  args = (params, tx.init(params), x, y)
  compiled, info = timing.jax_compile(jax.jit(step), *args)
  timing.block(compiled(*args))
  fns = {"xla_step": lambda: timing.block(compiled(*args))}
  if torch_on:
    tctx = workloads.build_torch(spec, "cpu")
    tstep = tctx["TA"].make_train_step(tctx["model"], 0.1)
    tstep(tctx["x"], tctx["y"])
    fns["torch_step"] = lambda: tstep(tctx["x"], tctx["y"])
  t = timing.interleaved(fns, reps, budget_s)
  out = {k: dict(ms=round(v["median_s"] * 1e3, 3), reps=v["reps"]) for k, v in t.items()}
  out["xla_step"].update(compile_s=info.get("compile_s"), lower_s=info.get("lower_s"))
  return out


def environment(threads: int) -> dict:
  env = user_loop.environment()
  dirty = subprocess.run(
    ["git", "status", "--porcelain", "native/onednn_conv", "nio_jax"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  ).stdout.strip()
  if dirty and not env["git_commit"].endswith("+uncommitted"):
    env["git_commit"] += "+uncommitted"
  env["onednn"] = oc.info()
  env["onednn_threads"] = threads or "runtime default"
  env["threading_env"] = {
    k: os.environ.get(k)
    for k in (
      "OMP_NUM_THREADS",
      "OMP_WAIT_POLICY",
      "OMP_PROC_BIND",
      "ONEDNN_CONV_THREADS",
      "ONEDNN_CONV_WEIGHTS_HWIO",
      "XLA_FLAGS",
    )
  }
  return env


def render_markdown(res: dict) -> str:
  env, win = res["environment"], res["window"]
  lines = [
    f"# oneDNN convolutions against XLA's at ResNet-20's shapes ({env['device']}, "
    f"{env['onednn']}, jax {env['versions'].get('jax')}, torch {env['versions'].get('torch', '-')})",
    "",
    f"Issue 30's prototype (`native/onednn_conv`). {env['date_utc']}, commit "
    f"{env['git_commit']}; load average {win.get('load_before')} before, "
    f"{win.get('load_after')} after, {win.get('cores')} cores; "
    f"{machine.verdict_markdown(res['quiet'])}. oneDNN threads: {env['onednn_threads']} "
    f"(OMP_WAIT_POLICY={env['threading_env'].get('OMP_WAIT_POLICY')}).",
    "",
    "Per operation, median ms of `--reps` interleaved calls, each a `jax.jit` of one op "
    "(XLA: `lax.conv_general_dilated` and its two VJP halves; oneDNN: the FFI call).",
    "",
  ]
  for b in res["batches"]:
    rows = [r for r in res["rows"] if r["batch"] == b]
    lines += [
      f"## B = {b}",
      "",
      "| conv | layers | fwd XLA | fwd oneDNN | bwd-data XLA | bwd-data oneDNN "
      "| bwd-weights XLA | bwd-weights oneDNN | jit call floor |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      ms = r["ms"]
      bd = ("xla/bwd_data", "onednn/bwd_data") if r["needs_input_grad"] else None
      cells = [
        f"{ms['xla/fwd']:.3f}",
        f"{ms['onednn/fwd']:.3f}",
        f"{ms['xla/bwd_data']:.3f}" + ("" if bd else " (unused)"),
        f"{ms['onednn/bwd_data']:.3f}" + ("" if bd else " (unused)"),
        f"{ms['xla/bwd_weights']:.3f}",
        f"{ms['onednn/bwd_weights']:.3f}",
        f"{ms['dispatch']:.3f}",
      ]
      lines.append(f"| {r['name']} | {r['layers']} | " + " | ".join(cells) + " |")
    s = res["summary"][str(b)]
    lines += [
      "",
      f"- Convolutions of one training step (fwd + input grad + weight grad per layer, no "
      f"input grad for the stem): XLA {s['xla_conv_ms']:.2f} ms, oneDNN "
      f"{s['onednn_conv_ms']:.2f} ms ({s['conv_ratio']:.2f}x); less the jit call floor per "
      f"call: XLA {s['xla_conv_net_ms']:.2f} ms, oneDNN {s['onednn_conv_net_ms']:.2f} ms"
      f" ({s['conv_ratio_net']}x).",
    ]
    if "xla_step_ms" in s:
      lines.append(
        f"- Measured step (a user's `jax.jit` SGD-momentum step, ResNet-20 no BN): XLA "
        f"{s['xla_step_ms']:.2f} ms"
        + (
          f", PyTorch {s['torch_step_ms']:.2f} ms ({s['xla_vs_torch']:.2f}x)"
          if "torch_step_ms" in s
          else ""
        )
        + "."
      )
      lines.append(
        f"- Estimated step with oneDNN's convolutions: {s['est_step_ms']:.2f} ms"
        + (
          f" = **{s['est_vs_torch']:.2f}x PyTorch** (target <= 1.0)" if "est_vs_torch" in s else ""
        )
        + f"; XLA's conv share of its step (net of the call floor) {s['xla_conv_share']:.0%}."
      )
    lines.append("")
  lines += [
    "The estimate is `XLA step - XLA conv sum + oneDNN conv sum` (the call floors cancel: "
    "both sums hold the same calls). It keeps the rest of the step as it is, although custom "
    "calls stop XLA from fusing around the convolutions, and it times each op alone (caches "
    "warm with its own operands), not inside the step.",
    "",
    f"Command: `{res['command']}`. Generated by `native/onednn_conv/bench_ops.py`.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="32,128")
  ap.add_argument("--reps", type=int, default=30, help="timed calls per op (median)")
  ap.add_argument("--warmup", type=int, default=5, help="untimed calls per op first")
  ap.add_argument("--step-reps", type=int, default=9, help="timed training steps (median)")
  ap.add_argument("--budget", type=float, default=60.0, help="seconds of timing per shape")
  ap.add_argument("--threads", type=int, default=0, help="oneDNN threads (0: OpenMP default)")
  ap.add_argument("--no-step", action="store_true", help="skip the step and PyTorch timings")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  ap.add_argument("--name", default=None, help="file stem (default onednn_prototype_<platform>)")
  a = ap.parse_args(argv)
  if not oc.available():
    print(f"onednn_conv unavailable: {oc.unavailable_reason()}", file=sys.stderr)
    return 2
  if a.threads:
    oc.set_num_threads(a.threads)
  torch_on = not (a.no_torch or a.no_step)
  if torch_on:
    try:
      import torch  # noqa: F401, PLC0415
    except ImportError:
      print("torch not installed: PyTorch step skipped", file=sys.stderr)
      torch_on = False
  batches = [int(b) for b in a.batches.split(",") if b]
  res = {
    "command": "python native/onednn_conv/bench_ops.py "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "batches": batches,
    "reps": a.reps,
    "warmup": a.warmup,
    "rows": [],
    "steps": {},
    "summary": {},
  }
  t0 = time.perf_counter()
  with machine.CpuWindow() as w:
    for b in batches:
      for conv in RESNET20_CONVS:
        r = time_shape(b, conv, a.reps, a.warmup, a.budget)
        print(json.dumps(r), flush=True)
        res["rows"].append(r)
      if not a.no_step:
        res["steps"][str(b)] = time_steps(b, a.step_reps, a.budget, torch_on)
        print(json.dumps({"batch": b, **res["steps"][str(b)]}), flush=True)
  res["wall_s"] = round(time.perf_counter() - t0, 1)
  res["window"] = w.record()
  res["quiet"] = machine.verdict(res["window"])
  for b in batches:
    rows = [r for r in res["rows"] if r["batch"] == b]
    xs, ds = step_sum(rows, "xla"), step_sum(rows, "onednn")
    xn, dn = step_sum(rows, "xla", net=True), step_sum(rows, "onednn", net=True)
    s = dict(
      xla_conv_ms=round(xs, 3),
      onednn_conv_ms=round(ds, 3),
      conv_ratio=round(ds / xs, 3),
      xla_conv_net_ms=round(xn, 3),
      onednn_conv_net_ms=round(dn, 3),
      conv_ratio_net=round(dn / xn, 3) if xn > 0 else None,
    )
    st = res["steps"].get(str(b))
    if st:
      xstep = st["xla_step"]["ms"]
      est = xstep - xs + ds
      s.update(xla_step_ms=xstep, est_step_ms=round(est, 3), xla_conv_share=round(xn / xstep, 3))
      if "torch_step" in st:
        tms = st["torch_step"]["ms"]
        s.update(
          torch_step_ms=tms,
          xla_vs_torch=round(xstep / tms, 3),
          est_vs_torch=round(est / tms, 3),
          meets_target=bool(est / tms <= 1.0),
        )
    res["summary"][str(b)] = s
  res["environment"] = environment(a.threads)
  name = a.name or f"onednn_prototype_{jax.default_backend()}"
  user_loop.write_results(a.out, name, res, render_markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
