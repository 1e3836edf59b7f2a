"""The benchmark's report: the environment it ran in, the Markdown table and the plot of the
JAX/PyTorch ratios."""

from __future__ import annotations

from nio_jax.bench import machine, require_torch


def environment(command: str | None = None):
  """Device, versions, dtype and the machine's state at the start of the run: the facts of
  `machine.environment` (kept whole under `environment`) under this report's keys."""
  env = machine.environment(command, extra_dists=("torch",))
  vers = env["versions"]
  env = dict(
    date=env["date_utc"],
    python=env["python"],
    platform=env["platform"],
    jax=vers.get("jax"),
    jax_backend=env["backend"],
    jax_device=env["device_kind"],
    cpu_count=env["cpu_count"],
    cores=env["cores"],
    load_at_start=env["load_average_at_start"],
    xla_flags=env["xla_flags"],
    dtype="float32",
    jaxlib=vers.get("jaxlib"),
    **{m: vers.get(m, "absent") for m in ("flax", "optax", "torch")},
    git_commit=env["git_commit"],
    environment=env,
  )
  if command is not None:
    env["command"] = command
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
