"""JAX (nio_jax) vs PyTorch (reference-style baseline) on the same model, batch and weights.

    python -m benchmarks.bench --models resnet20,resnet20_bn --batches 32 --reps 3
    nio-jax bench ...            (the CLI calls `benchmarks.bench:main(argv)`)

For every (model, batch) row it builds the Flax model from `nio_jax.models`, loads the same
weights into the PyTorch twin (`benchmarks/torch_baseline/models.py`), checks that both
frameworks compute the same GradCosine (1e-3 relative; a row that disagrees is flagged), then
times, with JAX and PyTorch repetitions interleaved in the same run (medians):

  pe        per-example gradients (sample-wise)
  gc        the GradCosine value (sample-wise)
  nio_sw    one full NIO step, sample-wise GradCosine
  nio_b     one full NIO step, batch setting D=4, r=0.2 (the released default)
  gradinit  one GradInit step (SGD variant, η=0.1), if `nio_jax.methods.gradinit` exists
  train     one plain training step (forward + backward + SGD with momentum)

JAX timings exclude compilation; lower and compile times are recorded separately, with XLA's
`memory_analysis()` (temp + argument bytes) where the backend provides it. Torch memory is
`torch.cuda.max_memory_allocated` on GPU, else the growth of the process' peak RSS during the
first torch call (a lower bound: 0 when it stays under an earlier peak).

Outputs `benchmarks/results/bench_<stamp>_<device>.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

ALL_MODELS = (
  "mlp",
  "resnet20",
  "resnet20_bn",
  "resnet56",
  "resnet56_bn",
  "resnet110",
  "resnet110_bn",
  "vgg19",
  "vgg19_bn",
  "vit_mini",
)
ALL_PARTS = ("pe", "gc", "nio_sw", "nio_b", "gradinit", "train")
GC_RTOL = 1e-3


def model_spec(name: str):
  """(registry name, kwargs, has_bn) of a bench model name."""
  if name.startswith("resnet"):
    bn = name.endswith("_bn")
    return name.split("_")[0], dict(norm="bn" if bn else "none"), bn
  if name.startswith("vgg"):
    return name, {}, name.endswith("_bn")
  return name, {}, False


def _nio_module():
  import importlib

  for name in ("nio_jax.nio_search", "nio_jax.nio"):
    try:
      mod = importlib.import_module(name)
      if hasattr(mod, "make_nio_step"):
        return mod
    except ImportError:
      pass
  raise ImportError("no nio_jax module with make_nio_step")


def _now():
  return time.perf_counter()


def _maxrss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Row:
  def __init__(self, model, batch):
    self.d: dict[str, Any] = dict(model=model, batch=batch, parts={}, notes=[])

  def note(self, s):
    print("  note:", s, flush=True)
    self.d["notes"].append(s)


def build(name: str, batch: int, seed: int = 0):
  import jax
  import jax.numpy as jnp

  from nio_jax import models
  from nio_jax.flax_utils import linen_loss_fn

  reg, kw, has_bn = model_spec(name)
  model = models.get(reg, **kw)
  h, w, c = models.input_shape(reg)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * batch, h, w, c)).astype(np.float32)
  y = rng.integers(0, 10, size=(2 * batch,)).astype(np.int32)
  variables = model.init(jax.random.key(seed), jnp.asarray(x[:2]), train=False)
  params = variables["params"]
  bs = variables.get("batch_stats")
  loss_fn = linen_loss_fn(model, batch_stats=bs)
  return dict(
    name=name,
    reg=reg,
    kw=kw,
    has_bn=has_bn,
    model=model,
    variables=variables,
    params=params,
    batch_stats=bs,
    loss_fn=loss_fn,
    x=x,
    y=y,
  )


def torch_device(jax_backend: str):
  try:
    import torch
  except ImportError:
    return None, "torch not installed"
  if jax_backend == "cpu":
    return "cpu", None
  if jax_backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
    return "cuda", None
  return None, f"torch has no {jax_backend} device here"


def build_torch(spec, device):
  from benchmarks.torch_baseline import models as tmodels

  tm = tmodels.get(spec["reg"], **spec["kw"])
  tmodels.load_flax_variables(tm, spec["variables"])
  tm = tm.to(device).train()
  return tm


def _sync(device):
  if device == "cuda":
    import torch

    torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, budget_s: float):
  """Median seconds of each fn, repetitions interleaved; fewer reps if one rep > budget."""
  times = {k: [] for k in fns}
  for r in range(reps):
    for k, f in fns.items():
      t0 = _now()
      f()
      times[k].append(_now() - t0)
    if r == 0 and sum(v[0] for v in times.values()) * reps > budget_s and reps > 1:
      reps_left = max(0, int(budget_s // max(sum(v[0] for v in times.values()), 1e-9)) - 1)
      if reps_left < reps - 1:
        for _ in range(reps_left):
          for k, f in fns.items():
            t0 = _now()
            f()
            times[k].append(_now() - t0)
        break
  return {
    k: dict(median_s=statistics.median(v), reps=len(v), all_s=[round(t, 5) for t in v])
    for k, v in times.items()
  }


def jax_compile(fn, *args):
  """(compiled, info) with separate lower / compile times and XLA memory analysis."""
  t0 = _now()
  lowered = fn.lower(*args)
  t1 = _now()
  compiled = lowered.compile()
  t2 = _now()
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
  return compiled, info


def _block(out):
  import jax

  return jax.block_until_ready(out)


def torch_memory(fn, device):
  import torch

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return dict(torch_peak_mb=round((torch.cuda.max_memory_allocated() - base) / 2**20, 2))
  before = _maxrss_mb()
  fn()
  return dict(torch_rss_growth_mb=round(_maxrss_mb() - before, 1))


# ------------------------------------------------------------------------------------------


def run_row(name, batch, parts, args, tdev, tdev_why):
  import importlib

  import jax
  import jax.numpy as jnp
  import optax

  from nio_jax import cosine, per_example
  from nio_jax import scales as scmod

  nio = _nio_module()
  row = Row(name, batch)
  spec = build(name, batch, args.seed)
  has_bn = spec["has_bn"]
  x_np, y_np = spec["x"][:batch], spec["y"][:batch]
  jbatch = {"image": jnp.asarray(x_np), "label": jnp.asarray(y_np)}
  jnext = {"image": jnp.asarray(spec["x"][batch:]), "label": jnp.asarray(spec["y"][batch:])}
  params, loss_fn = spec["params"], spec["loss_fn"]
  wrt = scmod.default_grad_filter
  row.d["num_params"] = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
  row.d["has_bn"] = has_bn
  backend = jax.default_backend()
  impl_sw = args.impl_sw or [cosine.default_impl(None, backend=backend)]
  impl_b = args.impl_b or [cosine.default_impl(4, backend=backend)]
  row.d["impl_sw"], row.d["impl_b"] = impl_sw, impl_b

  tm = None
  if tdev is not None:
    import torch

    from benchmarks.torch_baseline import algorithms as TA

    tm = build_torch(spec, tdev)
    tx = torch.from_numpy(np.ascontiguousarray(np.transpose(x_np, (0, 3, 1, 2)))).to(tdev)
    ty = torch.from_numpy(y_np.astype(np.int64)).to(tdev)
    half = batch // 2
    tx2 = torch.from_numpy(
      np.ascontiguousarray(np.transpose(spec["x"][batch : batch + half], (0, 3, 1, 2)))
    ).to(tdev)
    ty2 = torch.from_numpy(spec["y"][batch : batch + half].astype(np.int64)).to(tdev)
  else:
    row.note(f"PyTorch absent: {tdev_why}")

  def sample_ok(part):
    if has_bn:
      row.d["parts"][part] = dict(
        skipped="sample-wise GradCosine is not defined for a model "
        "with batch norm (cross-example coupling); the released "
        "code uses the batch setting"
      )
      return False
    return True

  # ---------- correctness: GradCosine on the same weights ----------
  check = {}
  settings = [("batch", 4)] + ([] if has_bn else [("sample", None)])
  for sname, d in settings:
    if sname == "sample" and not ({"pe", "gc", "nio_sw"} & set(parts)):
      continue
    if sname == "batch" and "nio_b" not in parts:
      continue
    impl = impl_sw[0] if d is None else impl_b[0]
    st = cosine.gradcosine(
      loss_fn, params, jbatch, num_chunks=d, overlap=0.2 if d else 0.0, wrt=wrt, impl=impl
    )
    jgc = float(st.gc)
    ent = dict(jax_gc=jgc, jax_grad_norm=float(st.grad_norm))
    if tm is not None:
      sm = TA.ScaledModel(tm)
      tgc, tnorms = TA.gradcosine(sm, tx, ty, num_chunks=d, overlap=0.2 if d else 0.0)
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

  # ---------- the parts ----------

  scales0, sspec = scmod.init_scales(params)

  def time_part(part, jax_fns: dict, torch_fn, torch_mem_fn=None):
    """jax_fns: label -> (jitted fn, args). Compiles, warms up, times interleaved."""
    ent = {}
    fns = {}
    for label, (fn, fargs) in jax_fns.items():
      try:
        compiled, info = jax_compile(fn, *fargs)
        t0 = _now()
        _block(compiled(*fargs))
        info["first_run_s"] = round(_now() - t0, 4)
        ent[f"jax[{label}]"] = info
        print(
          f"    jax[{label}] lower {info['lower_s']}s compile {info['compile_s']}s "
          f"first run {info['first_run_s']}s",
          flush=True,
        )
        fns[f"jax[{label}]"] = lambda c=compiled, a=fargs: _block(c(*a))
      except Exception as e:
        ent[f"jax[{label}]"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        row.note(f"{part} jax[{label}] failed: {type(e).__name__}: {str(e)[:200]}")
    if torch_fn is not None:
      try:
        t0 = _now()
        mem = torch_memory(torch_mem_fn or torch_fn, tdev)  # warm-up call, also measures memory
        ent["torch"] = dict(first_run_s=round(_now() - t0, 4), **mem)

        def tf():
          torch_fn()
          _sync(tdev)

        fns["torch"] = tf
      except Exception as e:
        ent["torch"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        row.note(f"{part} torch failed: {type(e).__name__}: {str(e)[:200]}")
    else:
      ent["torch"] = dict(absent=tdev_why or "no torch twin for this part")
    times = interleaved(fns, args.reps, args.budget)
    for k, v in times.items():
      ent[k].update(v)
    if "torch" in times:
      for k in times:
        if k != "torch":
          ent[k]["ratio_vs_torch"] = round(times[k]["median_s"] / times["torch"]["median_s"], 3)
    row.d["parts"][part] = ent
    print(
      f"  {part}: "
      + ", ".join(
        f"{k}={v.get('median_s', float('nan')):.4f}s"
        + (f" (x{v['ratio_vs_torch']})" if "ratio_vs_torch" in v else "")
        for k, v in ent.items()
        if "median_s" in v
      ),
      flush=True,
    )

  for part in parts:
    print(f" [{name} B={batch}] {part}", flush=True)
    try:
      if part == "pe":
        if not sample_ok(part):
          continue
        jfns = {}
        for impl in impl_sw:
          f = jax.jit(
            lambda p, b, impl=impl: per_example.sample_grads_selected(loss_fn, p, b, wrt, impl)[1]
          )
          jfns[impl] = (f, (params, jbatch))
        tf = None
        if tm is not None:
          sm = TA.ScaledModel(tm)
          pd = {n: v.detach() for n, v in sm.params().items()}
          tf = lambda: TA.per_example_grads(sm, pd, tx, ty)
        time_part(part, jfns, tf)
      elif part == "gc":
        if not sample_ok(part):
          continue
        jfns = {
          impl: (
            jax.jit(
              lambda p, b, impl=impl: cosine.gradcosine_stats(loss_fn, p, b, wrt=wrt, impl=impl).gc
            ),
            (params, jbatch),
          )
          for impl in impl_sw
        }
        tf = None
        if tm is not None:
          sm = TA.ScaledModel(tm)
          tf = lambda: TA.gradcosine(sm, tx, ty)
        time_part(part, jfns, tf)
      elif part in ("nio_sw", "nio_b"):
        if part == "nio_sw" and not sample_ok(part):
          continue
        d = None if part == "nio_sw" else 4
        jfns = {}
        for impl in impl_sw if d is None else impl_b:
          cfg = nio.NIOConfig(num_chunks=d, overlap=0.0 if d is None else 0.2, impl=impl)
          step, txo = nio.make_nio_step(loss_fn, sspec, cfg)
          jfns[impl] = (step, (params, scales0, txo.init(scales0), jbatch))
        tf = None
        if tm is not None:
          sm = TA.ScaledModel(tm)
          opt = TA.RescaleAdam(sm, 3e-3)
          tf = lambda: TA.nio_step(sm, opt, tx, ty, num_chunks=d, overlap=0.0 if d is None else 0.2)
        time_part(part, jfns, tf)
      elif part == "gradinit":
        if importlib.util.find_spec("nio_jax.methods.gradinit") is None:
          row.d["parts"][part] = dict(absent="nio_jax.methods.gradinit does not exist")
          continue
        GI = importlib.import_module("nio_jax.methods.gradinit")
        cfg = (
          GI.GradInitConfig.create(None, batch_size=batch)
          if "batch_size" in GI.GradInitConfig.__dataclass_fields__
          else None
        )
        step, txo, _ = GI.make_gradinit_step(loss_fn, sspec, cfg)
        jfns = {"default": (step, (params, scales0, txo.init(scales0), jbatch, jnext))}
        tf = None
        if tm is not None:
          sm = TA.ScaledModel(tm, grad_filter=lambda n: True)
          opt = TA.RescaleAdam(sm, 1e-3)
          tf = lambda: TA.gradinit_step(sm, opt, tx, ty, tx2, ty2, eta=0.1, gamma=1.0)
        time_part(part, jfns, tf)
      elif part == "train":
        opt = optax.sgd(0.1, momentum=0.9)
        mdl, bs = spec["model"], spec["batch_stats"]

        def jtrain(p, o, stats, b):
          def lf(p):
            if stats is None:
              logits = mdl.apply({"params": p}, b["image"])
              new = None
            else:
              logits, upd = mdl.apply(
                {"params": p, "batch_stats": stats}, b["image"], train=True, mutable=["batch_stats"]
              )
              new = upd["batch_stats"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean(), new

          (l, new), g = jax.value_and_grad(lf, has_aux=True)(p)
          u, o = opt.update(g, o, p)
          return optax.apply_updates(p, u), o, new, l

        jfns = {"default": (jax.jit(jtrain), (params, opt.init(params), bs, jbatch))}
        tf = None
        if tm is not None:
          import copy

          tmc = copy.deepcopy(tm)
          tf = TA.make_train_step(tmc, 0.1)
          tfn = lambda: tf(tx, ty)
        time_part(part, jfns, tfn if tm is not None else None)
    except Exception as e:
      row.note(f"{part} failed: {type(e).__name__}: {str(e)[:300]}")
      traceback.print_exc()
  # derived ratios: NIO step / training step, within each framework
  tr = row.d["parts"].get("train", {})
  for part in ("nio_sw", "nio_b", "gradinit"):
    ent = row.d["parts"].get(part, {})
    for k, v in ent.items():
      if isinstance(v, dict) and "median_s" in v:
        base = tr.get("torch" if k == "torch" else "jax[default]", {}).get("median_s")
        if base:
          v["ratio_vs_train_step"] = round(v["median_s"] / base, 2)
  return row.d


# ------------------------------------------------------------------------------------------


def environment():
  import jax

  env = dict(
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    python=platform.python_version(),
    platform=platform.platform(),
    jax=jax.__version__,
    jax_backend=jax.default_backend(),
    jax_device=str(jax.devices()[0].device_kind),
    cpu_count=os.cpu_count(),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    dtype="float32",
  )
  try:
    import jaxlib

    env["jaxlib"] = jaxlib.__version__
  except Exception:
    pass
  for mod in ("flax", "optax", "torch"):
    try:
      env[mod] = __import__(mod).__version__
    except Exception:
      env[mod] = "absent"
  try:
    import torch

    env["torch_threads"] = torch.get_num_threads()
  except Exception:
    pass
  return env


def _fmt(x, nd=3):
  return "—" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def markdown(result) -> str:
  env = result["env"]
  lines = [
    f"# nio_jax benchmark {env['date']}",
    "",
    f"Command: `{result['command']}`",
    "",
    f"Device: {env['jax_backend']} ({env['jax_device']}), {env['cpu_count']} CPUs; "
    f"jax {env['jax']}, jaxlib {env.get('jaxlib')}, flax {env['flax']}, torch "
    f"{env['torch']} ({env.get('torch_threads')} threads), python {env['python']}; "
    f"{env['dtype']}. JAX and PyTorch repetitions interleaved in the same run; medians.",
    "",
    "| model | B | part | impl | JAX s | torch s | JAX/torch | step/train (JAX) | "
    "step/train (torch) | lower s | compile s | XLA temp+arg MB | torch mem MB | "
    "GC check |",
    "|" + "---|" * 14,
  ]
  for r in result["rows"]:
    chk = "FLAGGED" if r.get("flagged") else ("ok" if r.get("gc_check") else "—")
    for part, ent in r["parts"].items():
      if "skipped" in ent or "absent" in ent:
        lines.append(
          f"| {r['model']} | {r['batch']} | {part} | — | — | — | — | — | — | — | — | "
          f"— | — | {ent.get('skipped') or 'absent: ' + ent['absent']} |"
        )
        continue
      t = ent.get("torch", {})
      tmem = t.get("torch_peak_mb", t.get("torch_rss_growth_mb"))
      for k, v in ent.items():
        if not k.startswith("jax["):
          continue
        if "error" in v:
          lines.append(
            f"| {r['model']} | {r['batch']} | {part} | {k[4:-1]} | error | | | | | "
            f"| | | | {v['error'][:80]} |"
          )
          continue
        lines.append(
          f"| {r['model']} | {r['batch']} | {part} | {k[4:-1]} | {_fmt(v.get('median_s'))} | "
          f"{_fmt(t.get('median_s'))} | {_fmt(v.get('ratio_vs_torch'))} | "
          f"{_fmt(v.get('ratio_vs_train_step'))} | {_fmt(t.get('ratio_vs_train_step'))} | "
          f"{_fmt(v.get('lower_s'))} | {_fmt(v.get('compile_s'))} | "
          f"{_fmt(v.get('xla_peak_mb'))} | {_fmt(tmem)} | {chk} |"
        )
  if result.get("skipped"):
    lines += ["", "Skipped:", ""] + [f"- {s}" for s in result["skipped"]]
  notes = [f"- {r['model']} B={r['batch']}: {n}" for r in result["rows"] for n in r["notes"]]
  if notes:
    lines += ["", "Notes:", ""] + notes
  return "\n".join(lines) + "\n"


def plot(result, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels, vals = [], []
  for r in result["rows"]:
    for part, ent in r["parts"].items():
      for k, v in ent.items():
        if k.startswith("jax[") and isinstance(v, dict) and "ratio_vs_torch" in v:
          labels.append(f"{r['model']} B{r['batch']} {part} {k[4:-1]}")
          vals.append(v["ratio_vs_torch"])
  if not labels:
    return False
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
  ax.barh(range(len(vals)), vals, color=["tab:green" if v <= 1 else "tab:red" for v in vals])
  ax.axvline(1.0, color="k", lw=0.8)
  ax.set_xscale("log")
  ax.set_yticks(range(len(vals)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("JAX time / PyTorch time (same run; < 1: JAX faster)")
  ax.set_title(f"nio_jax vs PyTorch on {result['env']['jax_backend']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def parse(argv):
  ap = argparse.ArgumentParser(prog="nio-jax bench", description=__doc__.split("\n")[0])
  ap.add_argument(
    "--models", default="mlp,resnet20", help=f"comma list from {','.join(ALL_MODELS)} or 'all'"
  )
  ap.add_argument("--batches", default="32", help="comma list, e.g. 32,64,128")
  ap.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma list of {ALL_PARTS}")
  ap.add_argument(
    "--impl-sw",
    default="",
    help="JAX sample-wise formulations to time (comma list; default: the library's default_impl)",
  )
  ap.add_argument("--impl-b", default="", help="JAX batch-setting formulations to time")
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
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  ap.add_argument("--tag", default="")
  ap.add_argument("--no-plot", action="store_true")
  a = ap.parse_args(argv)
  a.models = list(ALL_MODELS) if a.models == "all" else [m for m in a.models.split(",") if m]
  a.batches = [int(b) for b in a.batches.split(",") if b]
  a.parts = [p for p in a.parts.split(",") if p]
  a.impl_sw = [s for s in a.impl_sw.split(",") if s]
  a.impl_b = [s for s in a.impl_b.split(",") if s]
  for p in a.parts:
    if p not in ALL_PARTS:
      ap.error(f"unknown part {p!r}; known: {ALL_PARTS}")
  for m in a.models:
    if m not in ALL_MODELS:
      ap.error(f"unknown model {m!r}; known: {ALL_MODELS}")
  return a


def main(argv=None) -> dict:
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.torch_threads:
    import torch

    torch.set_num_threads(args.torch_threads)
  env = environment()
  tdev, why = torch_device(env["jax_backend"])
  env["torch_device"] = tdev or f"absent ({why})"
  cmd = "python -m benchmarks.bench " + " ".join(sys.argv[1:] if argv is None else argv)
  result = dict(env=env, command=cmd, rows=[], skipped=[])
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"bench_{stamp}_{env['jax_backend']}{args.tag}")
  grid = [
    f"{m} B={b}"
    for m in ALL_MODELS
    for b in (32, 64, 128)
    if m not in args.models or b not in args.batches
  ]
  if grid:
    result["skipped"].append(
      "not selected on the command line (time on this device): " + ", ".join(grid)
    )
  for m in args.models:
    for b in args.batches:
      print(f"== {m} batch {b}", flush=True)
      try:
        result["rows"].append(run_row(m, b, args.parts, args, tdev, why))
      except Exception as e:
        traceback.print_exc()
        result["rows"].append(
          dict(
            model=m, batch=b, parts={}, notes=[f"row failed: {type(e).__name__}: {str(e)[:300]}"]
          )
        )
      with open(base + ".json", "w") as f:  # after every row: partial results survive
        json.dump(result, f, indent=1, default=str)
  with open(base + ".md", "w") as f:
    f.write(markdown(result))
  if not args.no_plot:
    try:
      plot(result, base + ".png")
    except Exception as e:
      print("plot failed:", e)
  print(markdown(result))
  print("wrote", base + ".{json,md,png}")
  return result


if __name__ == "__main__":
  main()
