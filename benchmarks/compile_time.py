"""XLA compile time of CIFAR ResNets: scanned (``nn.scan`` blocks) vs unrolled.

For each depth / norm / layout it times, separately,
  * ``lower``:   ``jax.jit(f).lower(*abstract_args)`` (tracing + StableHLO emission), and
  * ``compile``: ``lowered.compile()`` (XLA optimisation + code generation),
of ``f`` = forward + backward of the mean cross-entropy w.r.t. the params (train mode; BN models
also return the updated ``batch_stats``). Arguments are ``jax.ShapeDtypeStruct``s, so nothing
is initialised or run. Optionally (``--nio``) the same for one NIO search step
(``nio_jax.make_nio_step``: sub-batch gradients, GradCosine and its gradient w.r.t. the scales).

    python -m benchmarks.compile_time                       # CPU defaults, writes results
    python -m benchmarks.compile_time --depths 20,56 --norms none --no-unrolled

The registry's default layout is the scanned one on every backend (``scan=True``), compiled
unrolled on XLA:CPU up to 32 blocks per stage (``scan_unroll=None``; ``--scan-unroll 1``
times the rolled loop, the default before issue 20); on XLA:CPU
the training and NIO steps canonicalise their convolutions (``jaxpr_rewrites.canonical_convs``),
which makes the scanned layout's step as fast as the unrolled one. NIO-step compile time of
ResNet-110 and ResNet-1202 in the default (scanned) layout:

    python -m benchmarks.compile_time --depths 110,1202 --norms none,bn --no-unrolled \
      --nio --nio-max-depth 1202 --nio-layouts scan

and both layouts of ResNet-110 (``--depths 110 --nio --nio-layouts scan,unrolled``).

Unrolled ResNet-1202 (600 blocks) is skipped by default (``--max-unrolled-depth 110``): its
trace alone is minutes and its compile tens of minutes on CPU; that is the point of scanning.
The whole measuring phase is one ``nio_jax.bench.machine.CpuWindow``: the result file stores
the other processes' CPU share and the quiet verdict (``meta["quiet"]``, NOISY above 5 %).
Results: ``benchmarks/results/compile_time_<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


from benchmarks import rerender  # noqa: E402
from nio_jax import models  # noqa: E402
from nio_jax.bench import machine  # noqa: E402
from nio_jax.jaxpr_rewrites import canonical_convs  # noqa: E402


def _abstract_variables(model, batch, dtype):
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), dtype)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x), x


def train_grad_fn(model, has_bn):
  """Forward + backward of the mean cross-entropy (train mode)."""

  def loss(params, rest, x, y):
    if has_bn:
      logits, upd = model.apply({"params": params, **rest}, x, train=True, mutable=["batch_stats"])
    else:
      logits, upd = model.apply({"params": params}, x, train=True), {}
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return ce, upd

  return jax.value_and_grad(loss, has_aux=True)


def time_lower_compile(jitted, *args):
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  del compiled
  return t1 - t0, t2 - t1


def nio_step_hook(model, variables, x, y, has_bn):
  """Lower+compile one NIO step; None when ``nio_jax.make_nio_step`` is unavailable."""
  try:
    import nio_jax
    from nio_jax.flax_utils import linen_loss_fn
  except Exception:  # pragma: no cover - core not there
    return None
  if not hasattr(nio_jax, "make_nio_step"):
    return None
  params = variables["params"]
  # batch_stats are closed over by the loss: they must be concrete arrays
  stats = None
  if has_bn:
    stats = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), variables["batch_stats"])
  loss_fn = linen_loss_fn(model, batch_stats=stats)
  # scales/spec structure from abstract params (init_scales only reads shapes and norms)
  concrete = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
  scales, spec = nio_jax.init_scales(concrete)
  search = nio_jax.make_nio_step(loss_fn, spec, None)
  opt_state = jax.eval_shape(search.init, scales)
  abstract = lambda t: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)  # noqa: E731
  batch = {"image": x, "label": y}
  return time_lower_compile(search.step, params, abstract(scales), opt_state, batch)


def render_markdown(data: dict) -> str:
  """The results table of one JSON file (`{"meta", "results"}`); the .md holds only this."""
  meta, rows = data["meta"], data["results"]
  lines = [
    f"# Compile time, CIFAR ResNets ({meta['device']}, jax {meta['jax']}, flax {meta['flax']})",
    "",
    f"Forward + backward of mean cross-entropy, train mode, batch {meta['batch']}, "
    f"{meta['dtype']}, 32x32x3 input; seconds. `lower` = trace + StableHLO, `compile` = XLA. "
    f"Load average at start {meta['loadavg_at_start'][0]:.1f} on {meta['cpu_count']} cores; "
    f"{meta['date']}; {machine.verdict_markdown(meta.get('quiet'))}.",
    "",
  ]
  has_nio = any("nio_compile_s" in r for r in rows)
  hdr = "| model | norm | layout | params | lower s | compile s | total s |" + (
    " NIO step lower s | NIO step compile s |" if has_nio else ""
  )
  lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
  for r in rows:
    layout = "scan" if r["scan"] else "unrolled"
    if "skipped" in r:
      cells = [r["model"], r["norm"], layout, "", "skipped", r["skipped"], ""]
    else:
      cells = [
        r["model"],
        r["norm"],
        layout,
        f"{r['params']:,}",
        f"{r['lower_s']:.2f}",
        f"{r['compile_s']:.2f}",
        f"{r['total_s']:.2f}",
      ]
    if has_nio:
      cells += (
        [f"{r['nio_lower_s']:.2f}", f"{r['nio_compile_s']:.2f}"]
        if "nio_compile_s" in r
        else ["", ""]
      )
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  if meta.get("command"):
    lines += [f"Command: `{meta['command']}`.", ""]
  lines += [
    "Generated by `benchmarks/compile_time.py` (re-render: "
    "`python -m benchmarks.compile_time --render <json>`); reading: docs/performance.md.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--depths", default="20,56,110,1202")
  ap.add_argument("--norms", default="none,bn")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--max-unrolled-depth", type=int, default=110)
  ap.add_argument("--no-unrolled", action="store_true")
  ap.add_argument(
    "--scan-unroll",
    type=int,
    default=None,
    help="the scanned models' scan_unroll (default: the registry's, unrolled on XLA:CPU up to "
    "32 blocks; 1 = the rolled loop, the default before issue 20)",
  )
  ap.add_argument("--nio", action="store_true", help="also time one NIO step (make_nio_step)")
  ap.add_argument("--nio-max-depth", type=int, default=110)
  ap.add_argument(
    "--nio-layouts", default="scan,unrolled", help="layouts for which the NIO step is timed"
  )
  ap.add_argument(
    "--out",
    default=None,
    help="JSON path (default benchmarks/results/compile_time_<platform>.json)",
  )
  ap.add_argument("--render", default=None, help="only rewrite the .md of this JSON file")
  args = ap.parse_args(argv)
  if args.render:
    rerender(args.render, render_markdown)
    return

  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  out = args.out or os.path.join(
    os.path.dirname(__file__), "results", f"compile_time_{dev.platform}.json"
  )
  env = machine.environment(
    " ".join(["python -m benchmarks.compile_time", *(argv if argv is not None else sys.argv[1:])])
  )
  meta = dict(
    device=env["device"],
    num_devices=env["device_count"],
    cpu_count=env["cpu_count"],
    loadavg_at_start=env["load_average_at_start"],
    jax=env["versions"].get("jax"),
    flax=env["versions"].get("flax"),
    python=env["python"],
    batch=args.batch,
    dtype=str(dtype),
    input_shape=[32, 32, 3],
    what="jax.jit(value_and_grad(mean CE)).lower(abstract args) then .compile(); seconds",
    date=env["date_utc"],
    command=env["command"],
    git_commit=env["git_commit"],
    environment=env,
  )
  rows = []
  with machine.CpuWindow() as window:
    for depth in [int(d) for d in args.depths.split(",")]:
      for norm in args.norms.split(","):
        for scan in (True, False):
          row = dict(model=f"resnet{depth}", norm=norm, scan=scan, depth=depth)
          if not scan and (args.no_unrolled or depth > args.max_unrolled_depth):
            row.update(
              skipped="--no-unrolled"
              if args.no_unrolled
              else f"unrolled depth > {args.max_unrolled_depth} (trace+compile too slow on CPU)"
            )
            rows.append(row)
            print(row, flush=True)
            continue
          unroll = {"scan_unroll": args.scan_unroll} if scan else {}
          model = models.get(f"resnet{depth}", norm=norm, scan=scan, dtype=None, **unroll)
          variables, x = _abstract_variables(model, args.batch, dtype)
          y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
          has_bn = "batch_stats" in variables
          rest = {k: v for k, v in variables.items() if k != "params"}
          # as the library's trainer: canonical convolutions on XLA:CPU
          lo, co = time_lower_compile(
            jax.jit(canonical_convs(train_grad_fn(model, has_bn))), variables["params"], rest, x, y
          )
          row.update(
            params=models.count_params(variables["params"]),
            lower_s=round(lo, 3),
            compile_s=round(co, 3),
            total_s=round(lo + co, 3),
          )
          if (
            args.nio
            and depth <= args.nio_max_depth
            and ("scan" if scan else "unrolled") in args.nio_layouts.split(",")
          ):
            r = nio_step_hook(model, variables, x, y, has_bn)
            if r is None:
              row["nio_step"] = "make_nio_step not available"
            else:
              row.update(nio_lower_s=round(r[0], 3), nio_compile_s=round(r[1], 3))
          rows.append(row)
          print(row, flush=True)
          with open(out, "w") as f:  # keep partial results
            json.dump(dict(meta=meta, results=rows), f, indent=1)
  meta["quiet"] = machine.verdict(window.record())
  meta["loadavg_at_end"] = machine.load_average()
  with open(out, "w") as f:
    json.dump(dict(meta=meta, results=rows), f, indent=1)
  md = out[: -len(".json")] + ".md"
  with open(md, "w") as f:
    f.write(render_markdown(dict(meta=meta, results=rows)))
  print("wrote", out, md)


if __name__ == "__main__":
  main()
