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
  gradinit  one GradInit step (SGD variant, η=0.1), if `nio_jax.methods.gradinit` exists
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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from nio_jax.bench import machine, require_torch

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
NIO_B_CHUNKS, NIO_B_OVERLAP = 4, 0.2  # the released batch setting
# A model without normalisation whose logits at init exceed this std gets scaled inputs
# (`build`): the bench then times the same computation without a saturated softmax.
LOGIT_STD_MAX = 10.0
MEMORY_TAG = "NIO_JAX_BENCH_MEMORY "  # prefix of the line a memory subprocess prints


class PartSkipped(Exception):
  """A part that does not apply to a row (the reason is the message)."""


def model_spec(name: str):
  """(registry name, kwargs, has_bn) of a bench model name."""
  if name.startswith("resnet"):
    bn = name.endswith("_bn")
    return name.split("_")[0], dict(norm="bn" if bn else "none"), bn
  if name.startswith("vgg"):
    return name, {}, name.endswith("_bn")
  return name, {}, False


def _now():
  return time.perf_counter()


def _block(out):
  import jax

  return jax.block_until_ready(out)


# ------------------------------------------------------------------------------------------
# The library's formulation option: the only place the bench names it.


# A formulation `form` is the string "pullback/conv" (e.g. "loop/im2col"), the label of its
# row; the command line gives the pullbacks and conv modes, and every pair is timed.


def formulations(pullbacks, convs, num_chunks, backend: str, spec=None) -> list[str]:
  """Every "pullback/conv" pair of the two lists, "auto" resolved as the library does (for
  the row `spec`'s loss when given: the batch setting's auto pullback depends on it)."""
  from nio_jax import per_example

  auto_p, auto_c = per_example.default_formulation(num_chunks, backend=backend)
  if spec is not None and num_chunks is not None:
    jbatch = {"image": spec["x"][: spec["batch"]], "label": spec["y"][: spec["batch"]]}
    auto_p = per_example.auto_subbatch_pullback(spec["loss_fn"], spec["params"], jbatch, backend)
  return [
    f"{auto_p if p == 'auto' else p}/{auto_c if c == 'auto' else c}"
    for p in pullbacks or ["auto"]
    for c in convs or ["auto"]
  ]


def default_formulations(backend: str, spec=None) -> tuple[list[str], list[str]]:
  """The library's default formulation for the sample-wise and the batch setting (for the
  row `spec`'s loss when given)."""
  return formulations([], [], None, backend), formulations([], [], NIO_B_CHUNKS, backend, spec)


def split_form(form: str) -> dict:
  """`{"pullback": ..., "conv": ...}` of a "pullback/conv" label."""
  pullback, conv = form.split("/")
  return dict(pullback=pullback, conv=conv)


def jax_gradcosine(loss_fn, params, batch, num_chunks, overlap, wrt, form):
  """GradCosine statistics of one batch with formulation `form`."""
  from nio_jax import cosine

  return cosine.gradcosine(
    loss_fn, params, batch, num_chunks=num_chunks, overlap=overlap, wrt=wrt, **split_form(form)
  )


def jax_per_example_fn(loss_fn, wrt, form):
  """Jitted `(params, batch) -> per-example gradients` with formulation `form`."""
  import jax

  from nio_jax import per_example

  f = split_form(form)
  return jax.jit(
    lambda p, b: per_example.sample_grads_selected(loss_fn, p, b, wrt, f["pullback"], f["conv"])[1]
  )


def jax_gc_fn(loss_fn, wrt, form):
  """Jitted `(params, batch) -> sample-wise GradCosine` with formulation `form`."""
  import jax

  from nio_jax import cosine

  return jax.jit(
    lambda p, b: cosine.gradcosine_stats(loss_fn, p, b, wrt=wrt, **split_form(form)).gc
  )


def jax_nio_config(num_chunks, overlap, form):
  """The NIOConfig of one NIO step with formulation `form`."""
  from nio_jax import nio_search

  return nio_search.NIOConfig(num_chunks=num_chunks, overlap=overlap, **split_form(form))


# ------------------------------------------------------------------------------------------
# Building a row: the model in both frameworks, and each part's functions.


def build(name: str, batch: int, seed: int = 0):
  """The Flax model, its variables, loss and a deterministic batch pair for one row."""
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
  bs = variables.get("batch_stats")
  input_scale = 1.0
  if not has_bn:
    # Deep nets without normalisation (ResNet-56 without BN) have logits of std ~1e5 at
    # Kaiming init: softmax saturates, some examples' loss and gradient are exactly 0 and the
    # sample-wise GC is undefined. The inputs are synthetic, so they are scaled (in both
    # frameworks alike) to give logits of unit std; weights and computation are unchanged.
    std = float(jnp.std(model.apply(variables, jnp.asarray(x[:batch]), train=False)))
    if np.isfinite(std) and std > LOGIT_STD_MAX:
      input_scale = 1.0 / std
      x = (x * input_scale).astype(np.float32)
  return dict(
    name=name,
    reg=reg,
    kw=kw,
    has_bn=has_bn,
    model=model,
    variables=variables,
    params=variables["params"],
    batch_stats=bs,
    loss_fn=linen_loss_fn(model, batch_stats=bs),
    x=x,
    y=y,
    batch=batch,
    input_scale=input_scale,
  )


def torch_device(jax_backend: str):
  """(torch device, None) for the JAX backend in use, or (None, why not)."""
  torch = require_torch()
  if jax_backend == "cpu":
    return "cpu", None
  if jax_backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
    return "cuda", None
  return None, f"torch has no {jax_backend} device here"


def build_torch(spec, device) -> dict:
  """The PyTorch twin with the Flax weights, and the row's inputs as tensors on `device`."""
  torch = require_torch()
  from nio_jax.bench.torch_baseline import algorithms, models

  tm = models.get(spec["reg"], **spec["kw"])
  models.load_flax_variables(tm, spec["variables"])
  tm = tm.to(device).train()
  batch, half = spec["batch"], spec["batch"] // 2

  def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))).to(device)

  return dict(
    TA=algorithms,
    model=tm,
    device=device,
    x=nchw(spec["x"][:batch]),
    y=torch.from_numpy(spec["y"][:batch].astype(np.int64)).to(device),
    x2=nchw(spec["x"][batch : batch + half]),
    y2=torch.from_numpy(spec["y"][batch : batch + half].astype(np.int64)).to(device),
  )


def part_fns(part: str, spec: dict, forms_sw, forms_b, tctx: dict | None):
  """The functions one part times.

  Args:
    part: one of ALL_PARTS.
    spec: the row, from `build`.
    forms_sw: formulations of the sample-wise setting to time.
    forms_b: formulations of the batch setting to time.
    tctx: the PyTorch twin and inputs (`build_torch`), or None.

  Returns:
    `(jax_fns, torch_fn)`: `{label: (jitted fn, args)}` and a zero-argument callable (None
    without `tctx`).

  Raises:
    PartSkipped: the part does not apply to this row.
  """
  import copy
  import importlib

  import jax
  import jax.numpy as jnp
  import optax

  from nio_jax import leaves
  from nio_jax import scales as scmod

  batch = spec["batch"]
  jbatch = {"image": jnp.asarray(spec["x"][:batch]), "label": jnp.asarray(spec["y"][:batch])}
  jnext = {"image": jnp.asarray(spec["x"][batch:]), "label": jnp.asarray(spec["y"][batch:])}
  params, loss_fn = spec["params"], spec["loss_fn"]
  wrt = leaves.resolve_grad_filter("default", loss_fn, params)  # what the search uses
  scales0, sspec = scmod.init_scales(params)
  TA = tctx["TA"] if tctx else None
  if part in ("pe", "gc", "nio_sw") and spec["has_bn"]:
    raise PartSkipped(
      "sample-wise GradCosine is not defined for a model with batch norm (cross-example "
      "coupling); the released code uses the batch setting"
    )
  torch_fn = None
  if part == "pe":
    jfns = {f: (jax_per_example_fn(loss_fn, wrt, f), (params, jbatch)) for f in forms_sw}
    if tctx:
      sm = TA.ScaledModel(tctx["model"])
      pd = {n: v.detach() for n, v in sm.params().items()}
      torch_fn = lambda: TA.per_example_grads(sm, pd, tctx["x"], tctx["y"])
  elif part == "gc":
    jfns = {f: (jax_gc_fn(loss_fn, wrt, f), (params, jbatch)) for f in forms_sw}
    if tctx:
      sm = TA.ScaledModel(tctx["model"])
      torch_fn = lambda: TA.gradcosine(sm, tctx["x"], tctx["y"])
  elif part in ("nio_sw", "nio_b"):
    from nio_jax import nio_search

    d, r = (None, 0.0) if part == "nio_sw" else (NIO_B_CHUNKS, NIO_B_OVERLAP)
    jfns = {}
    for f in forms_sw if d is None else forms_b:
      if spec["has_bn"] and split_form(f)["pullback"] == "segments":
        continue  # refused with batch norm (not exact); the row notes it
      step, txo = nio_search.make_nio_step(loss_fn, sspec, jax_nio_config(d, r, f))
      jfns[f] = (step, (params, scales0, txo.init(scales0), jbatch))
    if not jfns:
      raise PartSkipped("pullback=segments is refused for a model with batch norm (not exact)")
    if tctx:
      sm = TA.ScaledModel(tctx["model"])
      opt = TA.RescaleAdam(sm, 3e-3)
      torch_fn = lambda: TA.nio_step(sm, opt, tctx["x"], tctx["y"], num_chunks=d, overlap=r)
  elif part == "gradinit":
    if importlib.util.find_spec("nio_jax.methods.gradinit") is None:
      raise PartSkipped("nio_jax.methods.gradinit does not exist")
    GI = importlib.import_module("nio_jax.methods.gradinit")
    cfg = (
      GI.GradInitConfig.create(None, batch_size=batch)
      if "batch_size" in GI.GradInitConfig.__dataclass_fields__
      else None
    )
    step, txo, _ = GI.make_gradinit_step(loss_fn, sspec, cfg)
    jfns = {"default": (step, (params, scales0, txo.init(scales0), jbatch, jnext))}
    if tctx:
      sm = TA.ScaledModel(tctx["model"], grad_filter=lambda n: True)
      opt = TA.RescaleAdam(sm, 1e-3)
      torch_fn = lambda: TA.gradinit_step(
        sm, opt, tctx["x"], tctx["y"], tctx["x2"], tctx["y2"], eta=0.1, gamma=1.0
      )
  elif part == "train":
    opt = optax.sgd(0.1, momentum=0.9)
    mdl, bs = spec["model"], spec["batch_stats"]

    def jtrain(p, o, stats, b):
      def lf(p):
        if stats is None:
          return optax.softmax_cross_entropy_with_integer_labels(
            mdl.apply({"params": p}, b["image"]), b["label"]
          ).mean(), None
        logits, upd = mdl.apply(
          {"params": p, "batch_stats": stats}, b["image"], train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()
        return loss, upd["batch_stats"]

      (l, new), g = jax.value_and_grad(lf, has_aux=True)(p)
      u, o = opt.update(g, o, p)
      return optax.apply_updates(p, u), o, new, l

    # as the library's trainer: canonical convolutions on XLA:CPU (per_example.canonical_convs)
    from nio_jax.per_example import canonical_convs  # noqa: PLC0415

    jfns = {"default": (jax.jit(canonical_convs(jtrain)), (params, opt.init(params), bs, jbatch))}
    if tctx:
      step = TA.make_train_step(copy.deepcopy(tctx["model"]), 0.1)
      torch_fn = lambda: step(tctx["x"], tctx["y"])
  else:
    raise ValueError(f"unknown part {part!r}; known: {ALL_PARTS}")
  return jfns, torch_fn


# ------------------------------------------------------------------------------------------
# Measuring


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
    _block(mm(ja, jb))
    out = dict(
      n=n,
      dtype="float32",
      jax_gflops=round(machine.matmul_gflops(lambda: _block(mm(ja, jb)), n, reps), 1),
    )
    if device is not None:
      torch = require_torch()
      ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)

      def tmm():
        torch.mm(ta, tb)
        _sync(device)

      tmm()
      out["torch_gflops"] = round(machine.matmul_gflops(tmm, n, reps), 1)
  out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
  out["machine"] = w.record()
  return out


def _sync(device):
  if device == "cuda":
    require_torch().cuda.synchronize()


def memory_in_subprocess(request: dict, timeout_s: float) -> dict:
  """Peak memory of one part, measured by `nio_jax.bench.memory` in a fresh Python process.

  Args:
    request: what `nio_jax.bench.memory.measure` takes (model, batch, part, framework,
      label, seed, torch_threads).
    timeout_s: seconds before the subprocess is killed.

  Returns:
    The subprocess' figures, or `{"error": ...}`.
  """
  import nio_jax

  root = os.path.dirname(os.path.dirname(os.path.abspath(nio_jax.__file__)))
  env = dict(os.environ)  # the child imports this same copy of nio_jax
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "nio_jax.bench.memory", json.dumps(request)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return dict(error=f"memory subprocess exceeded {timeout_s:.0f} s")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(MEMORY_TAG):
      return json.loads(line[len(MEMORY_TAG) :])
  return dict(error=f"memory subprocess failed (rc {proc.returncode}): {proc.stderr[-300:]}")


class Row:
  def __init__(self, model, batch):
    self.d: dict[str, Any] = dict(model=model, batch=batch, parts={}, notes=[])

  def note(self, s):
    print("  note:", s, flush=True)
    self.d["notes"].append(s)


def check_gradcosine(row, spec, parts, forms_sw, forms_b, tctx):
  """Both frameworks' GradCosine on the same weights; flags a row that disagrees."""
  import jax.numpy as jnp

  from nio_jax import leaves

  batch = spec["batch"]
  jbatch = {"image": jnp.asarray(spec["x"][:batch]), "label": jnp.asarray(spec["y"][:batch])}
  check = {}
  settings = [("batch", NIO_B_CHUNKS)] + ([] if spec["has_bn"] else [("sample", None)])
  for sname, d in settings:
    if sname == "sample" and not ({"pe", "gc", "nio_sw"} & set(parts)):
      continue
    if sname == "batch" and "nio_b" not in parts:
      continue
    r = NIO_B_OVERLAP if d else 0.0
    form = forms_sw[0] if d is None else forms_b[0]
    if spec["has_bn"] and split_form(form)["pullback"] == "segments":
      form = "loop/" + split_form(form)["conv"]  # segments is refused with batch norm
    wrt = leaves.resolve_grad_filter("default", spec["loss_fn"], spec["params"])
    st = jax_gradcosine(spec["loss_fn"], spec["params"], jbatch, d, r, wrt, form)
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
  """Compiles, warms up and times one part (JAX and PyTorch interleaved) inside a CpuWindow."""
  ent, fns = {}, {}
  with machine.CpuWindow() as window:
    for label, (fn, fargs) in jfns.items():
      key = f"jax[{label}]"
      try:
        compiled, info = jax_compile(fn, *fargs)
        t0 = _now()
        _block(compiled(*fargs))
        info["first_run_s"] = round(_now() - t0, 4)
        ent[key] = info
        print(
          f"    {key} lower {info['lower_s']}s compile {info['compile_s']}s "
          f"first run {info['first_run_s']}s",
          flush=True,
        )
        fns[key] = lambda c=compiled, a=fargs: _block(c(*a))
      except Exception as e:
        ent[key] = dict(error=f"{type(e).__name__}: {e}"[:300])
        row.note(f"{part} {key} failed: {type(e).__name__}: {str(e)[:200]}")
    if torch_fn is not None:
      try:
        t0 = _now()
        torch_fn()  # warm-up
        _sync(tdev)
        ent["torch"] = dict(first_run_s=round(_now() - t0, 4))

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
    mem = memory_in_subprocess(req, args.memory_timeout)
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
  spec = build(name, batch, args.seed)
  row.d["num_params"] = int(
    sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(spec["params"]))
  )
  row.d["has_bn"] = spec["has_bn"]
  if spec["input_scale"] != 1.0:
    row.d["input_scale"] = spec["input_scale"]
    row.note(
      f"inputs scaled by {spec['input_scale']:.3g} so that the logits have unit std at init "
      f"(they exceeded std {LOGIT_STD_MAX}: saturated softmax, zero per-example gradients)"
    )
  backend = jax.default_backend()
  forms_sw = formulations(args.pullback_sw, args.conv_sw, None, backend)
  forms_b = formulations(args.pullback_b, args.conv_b, NIO_B_CHUNKS, backend, spec)
  row.d["forms_sw"], row.d["forms_b"] = forms_sw, forms_b
  if spec["has_bn"] and any(split_form(f)["pullback"] == "segments" for f in forms_b):
    row.note("pullback=segments not timed: refused with batch norm (not exact)")
  tctx = build_torch(spec, tdev) if tdev is not None else None
  if tctx is None:
    row.note(f"PyTorch absent: {tdev_why}")
  check_gradcosine(row, spec, parts, forms_sw, forms_b, tctx)
  for part in parts:
    print(f" [{name} B={batch}] {part}", flush=True)
    try:
      jfns, torch_fn = part_fns(part, spec, forms_sw, forms_b, tctx)
    except PartSkipped as e:
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
  for part in ("nio_sw", "nio_b", "gradinit"):
    for k, v in row.d["parts"].get(part, {}).items():
      if isinstance(v, dict) and "median_s" in v:
        base = tr.get("torch" if k == "torch" else "jax[default]", {}).get("median_s")
        if base:
          v["ratio_vs_train_step"] = round(v["median_s"] / base, 2)
  return row.d


# ------------------------------------------------------------------------------------------
# Reporting


def environment():
  """Device, versions, dtype and the machine's state at the start of the run."""
  import jax

  env = dict(
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    python=platform.python_version(),
    platform=platform.platform(),
    jax=jax.__version__,
    jax_backend=jax.default_backend(),
    jax_device=str(jax.devices()[0].device_kind),
    cpu_count=os.cpu_count(),
    cores=machine.cores(),
    load_at_start=machine.load_average(),
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
    env["torch_threads"] = require_torch().get_num_threads()
  except ImportError:
    pass
  return env


def _fmt(x, nd=3):
  return "—" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def _gflops(v):
  if "gflops" not in v:
    return "—"
  share = v.get("share_of_peak")
  return f"{v['gflops']:.3g}" + (f" ({share:.0%})" if share is not None else "")


def _mem(v):
  m = v.get("memory", {})
  return _fmt(m.get("rss_peak_mb"))


def _quiet(m):
  if not m:
    return "—"
  verdict = {True: "NOISY", False: "quiet", None: "unmeasured"}[m.get("noisy")]
  lb, la = m.get("load_before"), m.get("load_after")
  load = f"{lb[0] if lb else '?'}→{la[0] if la else '?'}"
  share = m.get("other_share")
  return f"{verdict} (load {load}, others {'?' if share is None else f'{share:.0%}'})"


def markdown(result) -> str:
  """The result as a Markdown report: environment, machine state, and one line per timing."""
  env, pk = result["env"], result.get("peak", {})
  noisy = [
    f"{r['model']} B={r['batch']} {p}"
    for r in result["rows"]
    for p, e in r["parts"].items()
    if e.get("machine", {}).get("noisy")
  ]
  lines = [
    f"# nio_jax benchmark {env['date']}",
    "",
    f"Command: `{result['command']}`",
    "",
    f"Device: {env['jax_backend']} ({env['jax_device']}), {env['cores']} cores "
    f"({env['cpu_count']} CPUs); jax {env['jax']}, jaxlib {env.get('jaxlib')}, flax "
    f"{env['flax']}, optax {env['optax']}, torch {env['torch']} ({env.get('torch_threads')} "
    f"threads), python {env['python']}; {env['dtype']}; XLA_FLAGS `{env['xla_flags']}`.",
    "",
    f"Load average (1, 5, 15 min) at start {env.get('load_at_start')}, at end "
    f"{env.get('load_at_end')}. Measured peak: {pk.get('n')}² {pk.get('dtype')} matmul, JAX "
    f"{pk.get('jax_gflops')} GFLOP/s, PyTorch {pk.get('torch_gflops')} GFLOP/s "
    f"(peak {pk.get('peak_gflops')}; {_quiet(pk.get('machine'))}).",
    "",
    "JAX and PyTorch repetitions interleaved in the same run; medians. GFLOP: XLA's "
    "cost_analysis of the JAX step (PyTorch's GFLOP/s uses the same count). Memory: RSS "
    "high-water above the baseline after imports and inputs, in a fresh process per part "
    "(JAX's includes compilation). A part is NOISY when other processes used more than "
    f"{machine.NOISE_SHARE:.0%} of the machine meanwhile: its timings are not results.",
    "",
  ]
  if noisy:
    lines += [f"**NOISY parts (not results): {', '.join(noisy)}.**", ""]
  lines += [
    "| model | B | part | pullback/conv | JAX s | torch s | JAX/torch | step/train (JAX) | "
    "step/train (torch) | GFLOP | JAX GFLOP/s (% peak) | torch GFLOP/s (% peak) | lower s | "
    "compile s | XLA temp+arg MB | JAX RSS MB | torch RSS MB | machine | GC check |",
    "|" + "---|" * 19,
  ]
  for r in result["rows"]:
    chk = "FLAGGED" if r.get("flagged") else ("ok" if r.get("gc_check") else "—")
    for part, ent in r["parts"].items():
      head = f"| {r['model']} | {r['batch']} | {part} |"
      if "skipped" in ent or "absent" in ent:
        why = ent.get("skipped") or "absent: " + ent["absent"]
        lines.append(head + " — |" * 15 + f" {why} |")
        continue
      t, q = ent.get("torch", {}), _quiet(ent.get("machine"))
      for k, v in ent.items():
        if not k.startswith("jax["):
          continue
        if "error" in v:
          lines.append(head + f" {k[4:-1]} | error |" + " |" * 13 + f" {v['error'][:80]} |")
          continue
        lines.append(
          head + f" {k[4:-1]} | {_fmt(v.get('median_s'))} | {_fmt(t.get('median_s'))} | "
          f"{_fmt(v.get('ratio_vs_torch'))} | {_fmt(v.get('ratio_vs_train_step'))} | "
          f"{_fmt(t.get('ratio_vs_train_step'))} | {_fmt(v.get('gflop'))} | {_gflops(v)} | "
          f"{_gflops(t)} | {_fmt(v.get('lower_s'))} | {_fmt(v.get('compile_s'))} | "
          f"{_fmt(v.get('xla_peak_mb'))} | {_mem(v)} | {_mem(t)} | {q} | {chk} |"
        )
  if result.get("skipped"):
    lines += ["", "Skipped:", ""] + [f"- {s}" for s in result["skipped"]]
  notes = [f"- {r['model']} B={r['batch']}: {n}" for r in result["rows"] for n in r["notes"]]
  if notes:
    lines += ["", "Notes:", ""] + notes
  return "\n".join(lines) + "\n"


def plot(result, path):
  """Bar chart of the JAX/PyTorch ratios (NOISY parts hatched)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels, vals, noisy = [], [], []
  for r in result["rows"]:
    for part, ent in r["parts"].items():
      for k, v in ent.items():
        if k.startswith("jax[") and isinstance(v, dict) and "ratio_vs_torch" in v:
          n = bool(ent.get("machine", {}).get("noisy"))
          labels.append(f"{r['model']} B{r['batch']} {part} {k[4:-1]}" + (" NOISY" if n else ""))
          vals.append(v["ratio_vs_torch"])
          noisy.append(n)
  if not labels:
    return False
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
  bars = ax.barh(range(len(vals)), vals, color=["tab:green" if v <= 1 else "tab:red" for v in vals])
  for b, n in zip(bars, noisy):
    if n:
      b.set_hatch("//")
  ax.axvline(1.0, color="k", lw=0.8)
  ax.set_xscale("log")
  ax.set_yticks(range(len(vals)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("JAX time / PyTorch time (same run; < 1: JAX faster)")
  env = result["env"]
  ax.set_title(
    f"nio_jax vs PyTorch on {env['jax_backend']} ({env['jax_device']}, {env['cores']} cores), "
    f"load at start {env.get('load_at_start')}",
    fontsize=8,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def parse(argv, default_out: str = "bench_results"):
  """The command line of `nio-jax bench` (see the module docstring)."""
  ap = argparse.ArgumentParser(prog="nio-jax bench", description=__doc__.split("\n")[0])
  ap.add_argument(
    "--models", default="mlp,resnet20", help=f"comma list from {','.join(ALL_MODELS)} or 'all'"
  )
  ap.add_argument("--batches", default="32", help="comma list, e.g. 32,64,128")
  ap.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma list of {ALL_PARTS}")
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
  a.models = list(ALL_MODELS) if a.models == "all" else [m for m in a.models.split(",") if m]
  a.batches = [int(b) for b in a.batches.split(",") if b]
  a.parts = [p for p in a.parts.split(",") if p]
  from nio_jax import per_example  # noqa: PLC0415  (after --help)

  for key, valid in (
    ("pullback_sw", (*per_example.SAMPLE_PULLBACKS, "auto")),
    ("pullback_b", (*per_example.SUBBATCH_PULLBACKS, "auto")),
    ("conv_sw", (*per_example.CONVS, "auto")),
    ("conv_b", (*per_example.CONVS, "auto")),
  ):
    setattr(a, key, [s for s in getattr(a, key).split(",") if s] or ["auto"])
    for v in getattr(a, key):
      if v not in valid:
        ap.error(f"unknown --{key.replace('_', '-')} {v!r}; valid: {', '.join(valid)}")
  for p in a.parts:
    if p not in ALL_PARTS:
      ap.error(f"unknown part {p!r}; known: {ALL_PARTS}")
  for m in a.models:
    if m not in ALL_MODELS:
      ap.error(f"unknown model {m!r}; known: {ALL_MODELS}")
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
  env = environment()
  tdev, why = torch_device(env["jax_backend"])
  env["torch_device"] = tdev or f"absent ({why})"
  result = dict(env=env, command=" ".join([prog, *argv]), rows=[], skipped=[])
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
  result["peak"] = peak_matmul(args.peak_size, tdev)
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
    f.write(markdown(result))
  if not args.no_plot:
    try:
      plot(result, base + ".png")
    except Exception as e:
      print("plot failed:", e)
  print(markdown(result))
  print("wrote", base + ".{json,md,png}")
  return result
