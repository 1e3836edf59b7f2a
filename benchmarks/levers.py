"""The cheaper speed levers of issue 30, measured against the library's defaults in one run.

Levers (variants of the same step, traced and compiled in one process and timed
interleaved there):

* `relu_mask`: the ReLU derivative as a multiply by the mask `x > 0` (a `jax.custom_jvp`)
  instead of `jax.nn.relu`'s `select`. The values are the same for finite inputs; the
  derivative of the mask is zero, so every order of autodiff stays a multiply. Applied by
  patching `flax.linen.relu` while each step is traced.
* `im2col_remat`: each im2col convolution under `jax.checkpoint` with nothing saveable: the
  backward recomputes the k*k patches from the input instead of keeping them.
* `hvp_linearize`, `hvp_vjp` (MetaInit's step only): the gradient and the Hessian-vector
  product from one `jax.linearize` / `jax.vjp` of `value_and_grad` instead of a
  `value_and_grad` beside a `jax.jvp` of `jax.grad` (`MetaInitConfig.hvp`).

Variants of the process (each its own child process, which also times PyTorch):

* `--env`: environment variables of the process, e.g. glibc's malloc settings
  (`MALLOC_MMAP_MAX_=0`: XLA's per-execution temporary buffer comes from the heap and is
  reused, instead of a fresh `mmap` whose pages fault in, zero-filled, on every step). The
  minor page faults per step are counted (`getrusage`) for every step.
* `--xla-flags`: extra XLA flags (e.g. the scheduler lever
  `--xla_cpu_enable_concurrency_optimized_scheduler=false`). XLA reads its flags once per
  process, so each flag set runs as its own child process; each child times its steps and the
  PyTorch training step of the same weights, so every ratio is to PyTorch in the same process.

For every (flags or environment, variant) it reports the step time, the ratio to PyTorch's training step and
XLA's temporary buffer size of the compiled step (`memory_analysis().temp_size_in_bytes`).
The steps: the training step (`train`), and NIO sample-wise (`nio_sw`) and batch-setting
(`nio_b`) search steps in the library's default formulation, as `benchmarks.bench` builds
them (`nio_jax.bench.workloads.part_fns`). Each child is one `CpuWindow`; the file stores the
verdict of each.

    ../shared/tools/quiet -- python -m benchmarks.levers --xla-flags= \
        --xla-flags=--xla_cpu_enable_concurrency_optimized_scheduler=false

    ../shared/tools/quiet -- python -m benchmarks.levers --models resnet110 --parts train \
        --xla-flags= --xla-flags=--xla_cpu_enable_concurrency_optimized_scheduler=false \
        --tag _resnet110

Results: `benchmarks/results/levers_<platform><tag>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("default", "relu_mask", "im2col_remat", "hvp_linearize", "hvp_vjp")
# variants that change only some steps (the others run as the default for every part)
ONLY_PARTS = {"hvp_linearize": ("metainit",), "hvp_vjp": ("metainit",)}


def applies(var: str, part: str) -> bool:
  """Whether the lever `var` changes the step `part` (else it is not run for that part)."""
  return part in ONLY_PARTS.get(var, (part,))


def mask_relu():
  """ReLU whose derivative multiplies by the mask `x > 0` instead of selecting."""
  import jax
  import jax.numpy as jnp

  @jax.custom_jvp
  def relu(x):
    return jnp.maximum(x, 0)

  @relu.defjvp
  def _jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return relu(x), t * (x > 0).astype(t.dtype)

  return relu


def fresh(spec: dict) -> dict:
  """`spec` with a new loss function object, so that no cached step of the other ReLU is
  reused (the searches cache compiled steps on the loss function object)."""
  from nio_jax.flax_utils import linen_loss_fn

  return dict(spec, loss_fn=linen_loss_fn(spec["model"], batch_stats=spec["batch_stats"]))


@contextlib.contextmanager
def variant(kind: str):
  """The lever `kind` in place while the block runs (steps are traced inside it).

  `relu_mask`: `flax.linen.relu` (what the zoo's models call) replaced by `mask_relu`.
  `im2col_remat`: every im2col convolution of the rewritten steps under `jax.checkpoint`
  with nothing saveable, so that its backward recomputes the patches from the input instead
  of keeping them (memory: the patches are k*k times the input).
  `hvp_*` patch nothing: they are a config, which `part_kwargs` passes to the step.
  """
  import flax.linen as nn
  import jax

  from nio_jax import jaxpr_rewrites as jr

  old_relu, old_conv = nn.relu, jr.conv_as_matmul
  if kind == "relu_mask":
    nn.relu = mask_relu()
  elif kind == "im2col_remat":

    def remat_conv(lhs, rhs, **params):
      f = lambda a, b: old_conv(a, b, **params)  # noqa: E731
      return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(lhs, rhs)

    jr.conv_as_matmul = remat_conv
  elif kind != "default" and not kind.startswith("hvp_"):
    raise ValueError(f"unknown variant {kind!r}; known: {VARIANTS}")
  try:
    yield
  finally:
    nn.relu, jr.conv_as_matmul = old_relu, old_conv


def part_kwargs(kind: str) -> dict:
  """The keyword arguments of `workloads.part_fns` that a step variant sets (the
  Hessian-vector product form of `hvp_*`; the other variants patch, see `variant`)."""
  return {"hvp": kind.removeprefix("hvp_")} if kind.startswith("hvp_") else {}


def child(models_, batch: int, parts, reps: int, budget: float, variants=VARIANTS) -> dict:
  import jax

  from nio_jax.bench import machine, timing, workloads

  out = {"rows": [], "xla_flags": os.environ.get("XLA_FLAGS")}
  with machine.CpuWindow() as win:
    for name in models_:
      spec = workloads.build(name, batch)
      tctx = workloads.build_torch(spec, "cpu")
      fns, info = {}, {}
      forms_sw, forms_b = workloads.default_formulations(jax.default_backend(), spec)
      # the anchor: PyTorch's training step of the same weights, built once (the JAX side of
      # this call is a jit that is never traced), also when `train` is not among `parts`
      _, torch_fn = workloads.part_fns("train", spec, forms_sw, forms_b, tctx)
      for part in parts:
        for var in variants:
          if not applies(var, part):
            continue
          with variant(var):
            try:
              jfns, _ = workloads.part_fns(
                part, fresh(spec), forms_sw, forms_b, None, **part_kwargs(var)
              )
            except workloads.PartSkipped:
              continue
            (form, (fn, args)), *_ = jfns.items()
            compiled, cinfo = timing.jax_compile(fn, *args)
          mem = compiled.memory_analysis()
          key = f"{part}/{var}"
          info[key] = dict(
            part=part,
            variant=var,
            form=form,
            compile_s=cinfo.get("compile_s"),
            temp_mb=round(mem.temp_size_in_bytes / 2**20, 2) if mem else None,
          )
          fns[key] = lambda c=compiled, a=args: timing.block(c(*a))
          fns[key]()  # the first call (allocations) is not counted
          info[key]["minor_faults_per_step"] = machine.minor_faults_per_call(fns[key])
      # each part's steps are timed interleaved with PyTorch's training step of the same
      # weights (its own anchor per part: a heavy step before it changes its time)
      torch_fn()
      anchors = {}
      for part in parts:
        keys = [k for k in fns if info[k]["part"] == part]
        if not keys:
          continue
        group = {k: fns[k] for k in keys} | {"torch_train": torch_fn}
        times = timing.interleaved(group, reps, budget)
        tms = times["torch_train"]["median_s"]
        anchors[part] = round(tms * 1e3, 2)
        for key in keys:
          t = times[key]
          info[key].update(step_ms=round(t["median_s"] * 1e3, 2), reps=t["reps"])
          info[key]["torch_train_ms"] = anchors[part]
          info[key]["vs_torch_train"] = round(t["median_s"] / tms, 3)
      out["rows"].append(dict(model=name, batch=batch, torch_train_ms=anchors, steps=info))
  out["window"] = win.record()
  out["environment"] = machine.environment(extra_dists=("torch",))
  out["quiet"] = machine.verdict(out["window"])
  return out


def check_equal(batch: int = 4, variants=VARIANTS) -> dict:
  """`{"<part>/<variant>": largest relative difference}` of each lever's step output (new
  scales, optimiser state, metrics) against the default's, ResNet-20 without BN at `batch`,
  for the NIO steps and MetaInit's."""
  import jax
  import numpy as np

  from nio_jax.bench import workloads

  spec = workloads.build("resnet20", batch)
  fs, fb = workloads.default_formulations(jax.default_backend(), spec)
  out = {}
  variants = ["default", *[v for v in variants if v != "default"]]
  if len(variants) == 1:
    return out
  for part in ("nio_sw", "nio_b", "metainit"):
    res = {}
    for var in variants:
      if not applies(var, part):
        continue
      with variant(var):
        jfns, _ = workloads.part_fns(part, fresh(spec), fs, fb, None, **part_kwargs(var))
        (fn, args), *_ = jfns.values()
        res[var] = [np.asarray(x) for x in jax.tree.leaves(fn(*args))]
    for var in [v for v in res if v != "default"]:
      out[f"{part}/{var}"] = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
        for a, b in zip(res[var], res["default"])
        if np.issubdtype(b.dtype, np.floating) and b.size
      )
  return out


def render(res: dict) -> str:
  from nio_jax.bench import machine

  env = res["runs"][0]["environment"]
  lines = [
    f"# Speed levers of issue 30 ({env['device']}, jax {env['versions'].get('jax')}, "
    f"torch {env['versions'].get('torch')}, float32)",
    "",
    f"Command: `{res['command']}`; commit {env.get('git_commit')}.",
    (
      "One step's outputs (scales, optimiser state, metrics) of each lever against the "
      "default's, ResNet-20 B=4, largest relative difference: "
      + ", ".join(f"{k} {v:.1e}" for k, v in res["equal_rel"].items())
      + "."
    )
    if res["equal_rel"]
    else "One step's variants: the default only (no step lever compared; the process variants' "
    "values are not compared).",
    "",
    "| XLA flags / environment | model | B | step | variant | ms | PyTorch train ms (same group) | x PyTorch train | temp MiB | minor page faults per step | verdict |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for run in res["runs"]:
    v = machine.verdict_markdown(run["quiet"])
    for row in run["rows"]:
      for ent in row["steps"].values():
        lines.append(
          f"| `{(run['extra_flags'] + ' ' + run.get('extra_env', '')).strip() or 'defaults'}` | "
          f"{row['model']} | {row['batch']} | "
          f"{ent['part']} | {ent['variant']} | {ent['step_ms']} | {ent['torch_train_ms']} | "
          f"{ent['vs_torch_train']} | "
          f"{ent['temp_mb']} | {ent.get('minor_faults_per_step')} | {v} |"
        )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet20,resnet20_bn")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--parts", default="train,nio_sw,nio_b")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--budget", type=float, default=120.0)
  p.add_argument(
    "--xla-flags",
    action="append",
    help="one child per use, e.g. --xla-flags= (the defaults) "
    "--xla-flags=--xla_cpu_enable_concurrency_optimized_scheduler=false",
  )
  p.add_argument(
    "--env",
    action="append",
    help="one more child per use with these environment variables (space-separated "
    "KEY=VALUE) and the default flags, e.g. --env 'MALLOC_MMAP_MAX_=0 "
    "MALLOC_TRIM_THRESHOLD_=68719476736' (glibc: no mmap per large buffer)",
  )
  p.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help=f"comma-separated levers to compile and time (of {VARIANTS}); default all",
  )
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
  p.add_argument("--tag", default="", help="suffix of the result files' names")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  models_, parts = a.models.split(","), a.parts.split(",")
  variants = a.variants.split(",")
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    p.error(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
  if a.child:
    print(json.dumps(child(models_, a.batch, parts, a.reps, a.budget, variants)))
    return 0
  runs = []
  procs = [(f, "") for f in a.xla_flags or [""]] + [("", e) for e in a.env or []]
  # The children's environment: this process's as it started (before `import nio_jax` here
  # appends the library's XLA defaults to XLA_FLAGS, which would then precede a child's own
  # flags), without its allocator settings (a child runs with the ones its `--env` names, so
  # a `defaults` row is glibc's defaults).
  base_env = dict(os.environ)
  from nio_jax.bench.machine import allocator_env  # noqa: PLC0415

  base_env = {k: v for k, v in base_env.items() if k not in allocator_env(base_env)}
  for extra, extra_env in procs:
    env = dict(base_env, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), extra]).strip()
    env.update(kv.split("=", 1) for kv in extra_env.split())
    cmd = [sys.executable, "-m", "benchmarks.levers", "--child", "--models", a.models]
    cmd += ["--batch", str(a.batch), "--parts", a.parts, "--reps", str(a.reps)]
    cmd += ["--budget", str(a.budget), "--variants", a.variants]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if r.returncode:
      sys.stderr.write(r.stderr)
      return r.returncode
    run = json.loads(r.stdout.strip().splitlines()[-1])
    run["extra_flags"], run["extra_env"] = extra, extra_env
    runs.append(run)
    print(f"flags {extra or 'defaults'} env {extra_env}: {run['quiet']['verdict']}", flush=True)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from nio_jax.bench import machine

  res = dict(
    command="python -m benchmarks.levers " + " ".join(sys.argv[1:] if argv is None else argv),
    environment=runs[0]["environment"] if runs else machine.environment(),
    runs=runs,
    equal_rel=check_equal(variants=variants),
  )
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"levers_cpu{a.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
  (out / f"levers_cpu{a.tag}.md").write_text(render(res))
  print(render(res))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
