"""Every measured figure in README.md and docs/*.md, generated from a committed result file.

    python -m benchmarks.docs_figures            # rewrite every block (and the demo picture)
    python -m benchmarks.docs_figures --check    # exit 1 if a block differs from its file

A block sits between two markers that name it and its source files:

    <!-- BEGIN generated NAME (python -m benchmarks.docs_figures; from FILE[, FILE]) -->
    ...
    <!-- END generated NAME -->

Each block is rendered by one function of :data:`BLOCKS` from those files only, and ends
with a provenance line per file: its quiet verdict, command and commit as the file records
them (:func:`provenance`). A file that lacks one of the three is listed in
:data:`UNRECORDED` with the reason, and its provenance line says "not recorded".
`tests/test_doc_figures.py` fails when a block differs from its rendering, or when a cited
file lacks a verdict, command or commit that :data:`UNRECORDED` does not excuse.

The registry's parameter-count table (`tests.test_generated_docs`) keeps its own markers and
generator; `main` rewrites it too, so this is the one command.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SWEEP = RESULTS / "sweep_fmnist"
ROUND1 = RESULTS / "sweep_fmnist_round1"  # the grid's first round, kept for the comparison
DEMO = RESULTS / "demo_cpu.json"
DEMO_PNG = REPO / "docs" / "images" / "demo_compare.png"
DEMO_COMMAND = (
  "../shared/tools/quiet -- env NIO_JAX_SKIP_SETUP=1 bash scripts/demo.sh --no-progress"
)
DOCS = [
  REPO / "README.md",
  *sorted((REPO / "docs").glob("*.md")),
  REPO / "native" / "onednn_conv" / "README.md",
]
TOOL = "python -m benchmarks.docs_figures"
MARK = re.compile(
  r"<!-- BEGIN generated (?P<name>[\w-]+) \(" + re.escape(TOOL) + r"; from (?P<src>[^)]*)\) -->"
  r"\n(?P<body>.*?)\n?<!-- END generated (?P=name) -->",
  re.S,
)

# Result files cited by a block that lack a quiet verdict, the command or the commit they
# ran on: (file relative to benchmarks/results, item) -> why. Nothing here is invented; the
# block says "not recorded" for these. Only the Fashion-MNIST sweep's first round is left: its
# first 73 runs predate the per-run verdict, and no run before issue 31 recorded its command or
# commit. Issue 31 reran the whole grid, which `benchmarks.sweep` records in full; the first
# round is kept (`sweep_fmnist_round1/`) only for the comparison of the two rounds.
UNRECORDED: dict[tuple[str, str], str] = {
  ("sweep_fmnist/table.json", "verdict"): "the table aggregates runs; their verdicts are per run",
  ("sweep_fmnist_round1/runs", "verdict"): "the first round's 73 runs predate the verdict",
  ("sweep_fmnist_round1/runs", "command"): "the first round's per-run JSON records no command",
  ("sweep_fmnist_round1/runs", "commit"): "the first round's per-run JSON records no commit",
}


# ----------------------------------------------------------------------------- provenance


def rel(path) -> str:
  return pathlib.Path(path).resolve().relative_to(RESULTS).as_posix()


def _machines(obj):
  """Every CpuWindow record (a dict with `noisy` and `other_share`) inside `obj`."""
  if isinstance(obj, dict):
    if "noisy" in obj and "other_share" in obj:
      yield obj
    for v in obj.values():
      yield from _machines(v)
  elif isinstance(obj, list):
    for v in obj:
      yield from _machines(v)


def _verdict_of_windows(windows) -> str | None:
  ws = list(windows)
  if not ws or any(w.get("noisy") is None for w in ws):
    return None
  share = max(w["other_share"] for w in ws)
  noisy = sum(bool(w["noisy"]) for w in ws)
  word = f"NOISY in {noisy} of {len(ws)} windows" if noisy else "QUIET"
  return f"{word} (other processes ≤ {100 * share:.1f} % of the cores in every window)"


def provenance(path) -> dict:
  """`{"verdict", "command", "commit"}` of a result file as it records them (None: absent).

  Formats: bench JSON (`command`, a CpuWindow per part and for the peak), compile_cache /
  user_loop (`window`, `environment.git_commit`), compile_time / dispatch_overhead (`meta`),
  profile_step (`quiet`), xla_flags (a window per row), the demo record, and the sweep's
  `runs/` folder (one verdict per run)."""
  path = pathlib.Path(path)
  if path.is_dir():  # the sweep's per-run JSON
    runs = [json.loads(p.read_text()) for p in sorted(path.glob("*__*__seed*.json"))]
    qs = [r.get("quiet") for r in runs]
    have = [q for q in qs if q]
    verdict = None
    if have and len(have) == len(qs):
      verdict = _verdict_of_windows(
        dict(noisy=q["verdict"] == "NOISY", other_share=q["other_cpu_share"]) for q in have
      )
    # the command and commit each run records (runs before issue 31 record neither)
    cmds = [r.get("command") for r in runs]
    commits = [(r.get("environment") or {}).get("git_commit") for r in runs]
    return dict(
      verdict=verdict,
      command="; ".join(sorted(set(cmds))) if runs and all(cmds) else None,
      commit=", ".join(sorted({c[:12] for c in commits})) if runs and all(commits) else None,
      runs=len(runs),
      with_verdict=len(have),
    )
  d = json.loads(path.read_text())
  meta = d.get("meta") or {}
  env = d.get("environment") or d.get("env") or {}
  command = d.get("command") or meta.get("command")
  commit = d.get("commit") or d.get("git_commit") or env.get("git_commit") or meta.get("git_commit")
  quiet = d.get("quiet", meta.get("quiet"))
  if isinstance(quiet, dict):
    verdict = quiet.get("verdict") and (
      f"{quiet['verdict']} (other processes {100 * quiet['other_cpu_share']:.1f} % of the cores)"
    )
  elif isinstance(quiet, str):
    verdict = quiet.removeprefix("quiet: ").split(" | ")[0] + " (`shared/tools/quiet`)"
    verdict = verdict if verdict.startswith(("QUIET", "NOISY")) else None
  else:
    verdict = _verdict_of_windows(_machines(d)) if "meta" not in d else None
  return dict(verdict=verdict, command=command, commit=commit)


def gaps(path) -> list[str]:
  """The items (verdict, command, commit) that `path` does not record."""
  p = provenance(path)
  return [k for k in ("verdict", "command", "commit") if not p[k]]


def _short_commit(commit: str) -> str:
  """The commit's first 12 hex digits, keeping a recorded `+uncommitted` (a dirty tree)."""
  head, _, dirty = commit.partition("+")
  return head[:12] + (f" with {dirty} changes" if dirty else "")


def source_line(path) -> str:
  """One line naming a result file and what it records of its run."""
  p = provenance(path)
  name = rel(path)
  txt = {k: p[k] for k in ("verdict", "command", "commit")}
  parts = [
    f"verdict {txt['verdict']}" if txt["verdict"] else "**verdict not recorded**",
    f"command `{txt['command']}`" if txt["command"] else "**command not recorded**",
    f"commit {_short_commit(txt['commit'])}" if txt["commit"] else "**commit not recorded**",
  ]
  if "runs" in p:
    parts[0] = (
      f"verdict recorded by {p['with_verdict']} of {p['runs']} runs"
      if p["with_verdict"] < p["runs"]
      else parts[0]
    )
  return f"Source `benchmarks/results/{name}`: " + "; ".join(parts) + "."


# ----------------------------------------------------------------------------- renderers


def latest(pattern: str) -> str:
  """The newest result file (by the timestamp in its name) matching `pattern` under
  benchmarks/results: a rerun replaces the file a block quotes without editing this module."""
  found = sorted(p.name for p in RESULTS.glob(pattern))
  if not found:
    raise FileNotFoundError(f"no result file benchmarks/results/{pattern}")
  return found[-1]


DEFAULTS_B32 = latest("bench_*_cpu_defaults.json")  # today's defaults, B=32


def _load(name):
  return json.loads((RESULTS / name).read_text())


def _fmt(x, spec=".2f", none="–"):
  return none if x is None else format(x, spec)


def bench_rows(name, parts=None, models=None):
  """`(model, batch, part, formulation, jax, torch, machine)` of a bench JSON."""
  d = _load(name)
  for r in d["rows"]:
    if models and r["model"] not in models:
      continue
    for part, v in r["parts"].items():
      if parts and part not in parts:
        continue
      for key, j in v.items():
        if key.startswith("jax"):
          form = key[4:-1] if key.startswith("jax[") else ""
          yield r["model"], r["batch"], part, form, j, v.get("torch") or {}, v.get("machine") or {}


PART_LABEL = {
  "train": "training step",
  "nio_sw": "NIO step, sample-wise",
  "nio_b": "NIO step, batch D=4 r=0.2",
  "gradinit": "GradInit step",
  "metainit": "MetaInit step",
}


def bench_table(name, parts=None, models=None, memory=True) -> str:
  """The rows of a bench JSON: JAX and PyTorch medians, their ratio, each step over its own
  framework's training step, compile time, peak RSS growth, other processes' share."""
  head = "| model | B | step (formulation) | JAX s | PyTorch s | JAX / PyTorch | step / own training step, JAX / PyTorch | lower + compile s |"
  head += " peak RSS JAX / PyTorch MB |" if memory else ""
  head += " other CPU |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for model, b, part, form, j, t, m in bench_rows(name, parts, models):
    if "median_s" not in j:
      continue
    own = (
      f"{_fmt(j.get('ratio_vs_train_step'), '.1f')} / {_fmt(t.get('ratio_vs_train_step'), '.1f')}"
    )
    own = "–" if part == "train" else own
    comp = (j.get("lower_s") or 0) + (j.get("compile_s") or 0)
    row = (
      f"| {model} | {b} | {PART_LABEL.get(part, part)}{f' ({form})' if form and form != 'default' else ''} | "
      f"{j['median_s']:.3f} | {_fmt(t.get('median_s'), '.3f')} | **{_fmt(j.get('ratio_vs_torch'))}** | "
      f"{own} | {comp:.1f} |"
    )
    if memory:
      jm, tm = (
        (j.get("memory") or {}).get("rss_peak_mb"),
        (t.get("memory") or {}).get("rss_peak_mb"),
      )
      row += f" {_fmt(jm, '.0f')} / {_fmt(tm, '.0f')} |"
    share = m.get("other_share")
    row += f" {_fmt(None if share is None else 100 * share, '.1f')} %{' NOISY' if m.get('noisy') else ''} |"
    lines.append(row)
  return "\n".join(lines)


def _bench_block(*names, parts=None, models=None, memory=True, note=""):
  def render():
    out = []
    for n in names:
      d = _load(n)
      pk = d.get("peak") or {}
      out.append(bench_table(n, parts, models, memory))
      out.append("")
      out.append(
        f"jax {d['env'].get('jax')}, torch {d['env'].get('torch')} with "
        f"{d['env'].get('torch_threads')} threads, {d['env'].get('dtype')}, {d['env'].get('cores')} "
        f"cores; matmul peak of the run {_fmt(pk.get('peak_gflops'), '.0f')} GFLOP/s. "
        + source_line(RESULTS / n)
      )
      out.append("")
    return (note + "\n\n" if note else "") + "\n".join(out).strip()

  return [RESULTS / n for n in names], render


def render_compile_cache():
  lines = [
    "| model | formulation | XLA flags | cold: lower + compile s | cached: lower + compile s | peak RSS growth cold → cached GB | step s |",
    "|---|---|---|---|---|---|---|",
  ]
  names = ["compile_cache_cpu.json", "compile_cache_cpu_bn.json", "compile_cache_cpu_flags.json"]
  for n in names:
    d = _load(n)
    for r in d["rows"]:
      c, k = r["cold"], r.get("cached")
      cold = c["lower_s"] + c["compile_s"]
      cached = f"{k['lower_s'] + k['compile_s']:.1f}" if k else "–"
      rss = (
        f"{c.get('rss_peak_mb', 0) / 1000:.2f} → {k['rss_peak_mb'] / 1000:.2f}"
        if k and c.get("rss_peak_mb")
        else (f"{c['rss_peak_mb'] / 1000:.2f}" if c.get("rss_peak_mb") else "–")
      )
      lines.append(
        f"| {d['model']} | {r['form']} | {r['flags'] or '-'} | {cold:.1f} | {cached} | {rss} | {c['step_s']:.3f} |"
      )
  return "\n".join(lines) + "\n\n" + "\n".join(source_line(RESULTS / n) for n in names)


def memory_ratios() -> list[tuple[str, float, float]]:
  """(step, JAX peak RSS growth from the compilation cache GB, PyTorch twin's GB)."""
  cc = {r["form"]: r for r in _load("compile_cache_cpu.json")["rows"] if not r["flags"]}
  bn = {r["form"]: r for r in _load("compile_cache_cpu_bn.json")["rows"] if not r["flags"]}
  torch = {
    (model, part): t["memory"]["rss_peak_mb"]
    for model, _, part, _, _, t, _ in bench_rows(DEFAULTS_B32)
    if t.get("memory")
  }
  return [
    (
      "NIO sample-wise (vmap/im2col), no BN",
      cc["vmap/im2col"]["cached"]["rss_peak_mb"],
      torch[("resnet20", "nio_sw")],
    ),
    (
      "NIO batch (segments/im2col), no BN",
      cc["segments/im2col"]["cached"]["rss_peak_mb"],
      torch[("resnet20", "nio_b")],
    ),
    (
      "NIO batch (loop/im2col), BN",
      bn["loop/im2col"]["cached"]["rss_peak_mb"],
      torch[("resnet20_bn", "nio_b")],
    ),
  ]


def render_memory():
  rows = memory_ratios()
  lines = [
    "| ResNet-20 B=32 | JAX peak RSS growth, step from the cache (GB) | PyTorch twin (GB) | JAX / PyTorch |",
    "|---|---|---|---|",
  ]
  lines += [f"| {s} | {j / 1000:.2f} | {t / 1000:.2f} | **{j / t:.1f}x** |" for s, j, t in rows]
  ratios = [j / t for _, j, t in rows]
  lines.append("")
  lines.append(
    f"Memory from the cache is {min(ratios):.1f}-{max(ratios):.1f}x PyTorch's (target 2x: missed)."
  )
  for n in ("compile_cache_cpu.json", "compile_cache_cpu_bn.json", DEFAULTS_B32):
    lines.append(source_line(RESULTS / n))
  return "\n".join(lines)


def render_user_loop(names=("user_loop_cpu.json",)):
  """The user-loop tables of each file (with its depth table, where it has one)."""
  from benchmarks import user_loop  # noqa: PLC0415

  out = []
  for name in names:
    md = user_loop.render_markdown(_load(name)).splitlines()
    first = next(i for i, ln in enumerate(md) if ln.startswith("|"))
    last = max(i for i, ln in enumerate(md) if ln.startswith("|"))
    out += [ln for ln in md[first : last + 1] if not ln.startswith("`default` is")]
    out += ["", source_line(RESULTS / name), ""]
  return "\n".join(out).strip()


DEPTH = ("user_loop_cpu_depth.json", "user_loop_cpu_depth_hugetlb.json")
TRAIN_CONVS = ("user_loop_cpu_convforms.json",)


def _md_tables(module, name):
  import importlib  # noqa: PLC0415

  md = importlib.import_module(f"benchmarks.{module}").render_markdown(_load(name))
  return "\n".join(ln for ln in md.splitlines() if ln.startswith("|"))


def render_compile_time():
  return (
    _md_tables("compile_time", "compile_time_cpu.json")
    + "\n\n"
    + source_line(RESULTS / "compile_time_cpu.json")
  )


def render_dispatch():
  return (
    _md_tables("dispatch_overhead", "dispatch_overhead_cpu.json")
    + "\n\n"
    + source_line(RESULTS / "dispatch_overhead_cpu.json")
  )


def render_xla_flags():
  d = _load("xla_flags_cpu.json")
  lines = [
    "| model | XLA flags | gradient median ms | vs XLA's own fusions | rel. error vs float64 | NaN images give a NaN loss | other CPU |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in d["rows"]:
    lines.append(
      f"| {r['model']} {'no BN' if r['norm'] == 'none' else 'BN'} | {r['flags']} | "
      f"{1000 * r['median_s']:.1f} | {r['vs_xla']:.2f} | {r['rel_err']:.1e} | "
      f"{'yes' if r['nan_propagates'] else '**no**'} | {100 * r['other_share']:.1f} % |"
    )
  return "\n".join(lines) + "\n\n" + source_line(RESULTS / "xla_flags_cpu.json")


def render_profiles():
  return "\n".join(
    f"- `{n[:-5]}.md` ({_load(n)['model']}, B={_load(n)['batch']}). " + source_line(RESULTS / n)
    for n in PROFILES
  )


# ---- the sweep


def sweep_table(model: str) -> str:
  """One model's rows of `sweep_fmnist/table.md`, rendered by `benchmarks.sweep.markdown`
  from `table.json`."""
  from benchmarks import sweep  # noqa: PLC0415

  grid = sweep.load_grid("fmnist")
  tab = json.loads((SWEEP / "table.json").read_text())["table"]
  md = sweep.markdown(grid, {model: tab[model]}, [])
  return "\n".join(ln for ln in md.splitlines() if ln.startswith("|"))


def sweep_runs(model=None, method=None, seeds=None) -> list[dict]:
  out = []
  for p in sorted((SWEEP / "runs").glob("*__*__seed*.json")):
    r = json.loads(p.read_text())
    if (model and r["cell_model"] != model) or (method and r["cell_method"] != method):
      continue
    if seeds is not None and r["seed"] not in seeds:
      continue
    out.append(r)
  return out


def quiet_summary(runs) -> str:
  qs = [r.get("quiet") for r in runs]
  have = [q for q in qs if q]
  noisy = [q for q in have if q["verdict"] == "NOISY"]
  txt = f"{len(have)} of {len(runs)} runs record a verdict"
  if have:
    txt += (
      f", {len(have) - len(noisy)} QUIET and {len(noisy)} NOISY; other processes' share "
      f"at most {100 * max(q['other_cpu_share'] for q in have):.2f} %"
    )
  return txt


# Runs whose search time includes a compilation besides the cell's first seed: the first run
# of a later sweep process in a cell it had begun (a new process compiles again).
# (model, method) -> seeds. The rerun of issue 31 restarted its process only between cells or
# in cells without a search (kaiming, warmup), so none of its searches compiled twice.
RECOMPILED: dict[tuple[str, str], list[int]] = {}


def _steady_search(model, method):
  rs = sweep_runs(model, method)
  if not rs:
    raise ValueError(f"no sweep runs of {model}/{method} in {SWEEP / 'runs'}")
  first = min(r["seed"] for r in rs)
  skip = {first, *RECOMPILED.get((model, method), [])}
  warm = [r for r in rs if r["seed"] not in skip]
  return (
    statistics.mean(r["search_seconds"] for r in warm),
    statistics.mean(r["search_rel_step"] for r in warm),
    sorted(skip),
  )


def render_quiet_cells():
  """The quiet verdicts per sweep cell, from the per-run JSON (the cell-level shares that
  `shared/tools/quiet` printed are in no file and are not quoted)."""
  from benchmarks import sweep  # noqa: PLC0415

  grid = sweep.load_grid("fmnist")
  lines = [
    "| model | runs | with a verdict | QUIET | NOISY | highest other-process share |",
    "|---|---|---|---|---|---|",
  ]
  for model in dict.fromkeys(c["model"] for c in grid["cells"]):
    rs = sweep_runs(model)
    qs = [r["quiet"] for r in rs if r.get("quiet")]
    hi = f"{100 * max(q['other_cpu_share'] for q in qs):.2f} %" if qs else "–"
    n = sum(q["verdict"] == "NOISY" for q in qs)
    lines.append(f"| {model} | {len(rs)} | {len(qs)} | {len(qs) - n} | {n} | {hi} |")
  commits = collections.Counter(
    ((r.get("environment") or {}).get("git_commit") or "not recorded")[:12] for r in sweep_runs()
  )
  lines += [
    "",
    "Commits the runs started from: "
    + ", ".join(f"{c} ({n} runs)" for c, n in sorted(commits.items()))
    + ".",
    "",
    source_line(SWEEP / "runs"),
  ]
  return "\n".join(lines)


def render_significant():
  """Every (model, method, point) the spread rule separates from Kaiming, better or worse
  (`benchmarks.sweep_stats`, from the per-run JSON)."""
  from benchmarks import sweep  # noqa: PLC0415
  from benchmarks import sweep_stats as ss  # noqa: PLC0415

  order = ss.grid_order(sweep.load_grid("fmnist"))
  table = ss.significance_table(ss.load_runs(SWEEP / "runs"), order)
  return table + "\n\n" + source_line(SWEEP / "runs")


def render_rounds():
  """Each cell's mean at step 100 and at the end in the first round and in the rerun (issue
  31), from both rounds' per-run JSON: how far float-level changes of the code between the
  rounds move the same seeds."""
  from benchmarks import sweep  # noqa: PLC0415
  from benchmarks import sweep_stats as ss  # noqa: PLC0415

  old, new = (ss.by_cell(ss.load_runs(folder / "runs")) for folder in (ROUND1, SWEEP))
  lines = [
    "| model | method | seeds | Acc@100 first round | Acc@100 rerun | end first round "
    "| end rerun | end: largest change of one seed |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for key in ss.grid_order(sweep.load_grid("fmnist")):
    a, b = (rounds.get(key[0], {}).get(key[1], []) for rounds in (old, new))
    cells = [
      ss.pct(ss.summary(ss.value(r, point) for r in rs))
      for point in ("Acc@100", "end")
      for rs in (a, b)
    ]
    by_seed = {r["seed"]: ss.value(r, "end") for r in a}
    deltas = [
      abs(ss.value(r, "end") - by_seed[r["seed"]])
      for r in b
      if ss.value(r, "end") is not None and by_seed.get(r["seed"]) is not None
    ]
    big = f"{100 * max(deltas):.1f}" if deltas else "–"
    lines.append(
      f"| {key[0]} | {key[1]} | {len(a)} / {len(b)} | " + " | ".join(cells) + f" | {big} |"
    )
  lines += [
    "",
    "Seeds: first round / rerun (a diverged run has no accuracy and is left out of its mean). "
    + source_line(ROUND1 / "runs"),
    source_line(SWEEP / "runs"),
  ]
  return "\n".join(lines)


def _sweep_block(model, extra=None):
  def render():
    out = sweep_table(model) + "\n\nRuns: " + quiet_summary(sweep_runs(model)) + "."
    if extra:
      out += "\n\n" + extra()
    return out + "\n\n" + source_line(SWEEP / "runs")

  return [SWEEP / "table.json", SWEEP / "runs"], render


def _resnet32_search_note():
  s, rel_, skip = _steady_search("resnet32_nobn", "nio")
  seeds = ("seed " if len(skip) == 1 else "seeds ") + ", ".join(map(str, skip))
  return (
    f"NIO's search on ResNet-32 without the runs that compiled ({seeds}): {s:.1f} s "
    f"({rel_:.0f}× one training step). The search columns of every cell drop its first seed, "
    "which compiles the search step."
  )


def render_lsuv_best_end():
  from benchmarks import sweep  # noqa: PLC0415

  grid = sweep.load_grid("fmnist")
  tab = json.loads((SWEEP / "table.json").read_text())["table"]
  models = dict.fromkeys(c["model"] for c in grid["cells"])
  nobn = [m for m in models if "lsuv" in tab[m] and not m.endswith("_bn")]
  best = {m: max(tab[m], key=lambda k, m=m: tab[m][k]["acc_end"][0] or -1) for m in nobn}
  won = [m for m in nobn if best[m] == "lsuv"]
  return (
    f"LSUV has the best end mean on {len(won)} of the {len(nobn)} models without BN "
    f"({', '.join(won)}). "
    + source_line(SWEEP / "table.json").replace("Source", "Source of the table")
  )


# ---- the demo


def demo_record():
  return json.loads(DEMO.read_text()) if DEMO.exists() else None


def render_demo():
  from nio_jax import reports  # noqa: PLC0415

  d = demo_record()
  if d is None:
    return (
      "The demo's table and picture are to be regenerated from a run of the current code: "
      f"`{DEMO_COMMAND}` writes `benchmarks/results/demo_cpu.json`, then `{TOOL}` renders "
      "this block and `docs/images/demo_compare.png` from it."
    )
  out = d["compare"]
  secs = ", ".join(f"{reports.method_label(m)} {s:.0f} s" for m, s in out["seconds"].items())
  return (
    reports.compare_table(out)
    + "\n\n"
    + reports.compare_sentence(out)
    + "\n\n"
    + f"Wall time of the compare command {out['wall_seconds']:.0f} s ({secs}; compilation "
    f"included), the demo script {d['wall_seconds']:.0f} s after setup, on {d['device']}. "
    + source_line(DEMO)
  )


def render_demo_picture(path=DEMO_PNG):
  """The demo's picture from the same record (None when there is no record)."""
  d = demo_record()
  if d is None:
    return None
  from nio_jax import reports  # noqa: PLC0415

  return reports.plot_compare(d["compare"], path)


def render_vs_kaiming(model):
  """Each method against Kaiming on one model, point by point: the difference of the means
  and the summed sample std (bold where the spread rule separates them), the seed-by-seed
  wins–losses with the two-sided sign test, and at step 100 the median and the seeds near
  chance (`benchmarks.sweep_stats`, from the per-run JSON)."""
  from benchmarks import sweep  # noqa: PLC0415
  from benchmarks import sweep_stats as ss  # noqa: PLC0415

  grid = sweep.load_grid("fmnist")
  recs = [r for r in ss.load_runs(SWEEP / "runs") if r["cell_model"] == model]
  order = ss.grid_order(grid)
  summ = ss.summaries(recs, order)[model]
  signs = ss.sign_tests(recs, order)[model]
  pts = summ["points"]
  at = f"Acc@{ss.CHANCE_STEP}"
  head = [
    "method",
    *pts,
    f"median @{ss.CHANCE_STEP}",
    f"seeds < {100 * ss.CHANCE:.0f} % @{ss.CHANCE_STEP}",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base = summ["methods"][ss.BASELINE]
  for method, row in summ["methods"].items():
    cells = []
    for p in pts:
      if method == ss.BASELINE:
        cells.append(ss.pct(row[p]))
        continue
      a, b = row[p], base[p]
      diff, spread = 100 * (a["mean"] - b["mean"]), 100 * (a["std"] + b["std"])
      rule = ss.spread_rule(a, b)
      d = f"{diff:+.1f}"
      d = f"**{d} better**" if rule > 0 else (f"**{d} worse**" if rule < 0 else d)
      s = signs["methods"][method][p]
      ties = f" ({s['ties']} tied)" if s["ties"] else ""
      cells.append(f"{d} ({spread:.1f}); {s['wins']}–{s['losses']}{ties}, p {s['p']:.2g}")
    med = row.get(at)
    nc = row["near_chance"]
    cells.append("–" if not med or med["median"] is None else f"{100 * med['median']:.1f}")
    cells.append("–" if nc is None else f"{nc} of {med['n']}")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return (
    "\n".join(lines)
    + "\n\nKaiming's row: its mean ± std (%). Other rows: the difference of the means from "
    "Kaiming's in points (summed sample std in parentheses; **bold** where it exceeds that "
    "spread), then wins–losses against Kaiming's same seed and the two-sided exact sign test. "
    + source_line(SWEEP / "runs")
  )


def render_gc_every():
  d = _load("gc_every_cost_cpu.json")
  runs = {r["gc_every"]: r for r in d["runs"]}
  off, on = runs[0], max((r for r in d["runs"] if r["gc_every"]), key=lambda r: r["gc_every"])
  lines = [
    "| `gc_every` | training s (measurements excluded) | s per training step | measurements | GC s in all | s per measurement | in training steps |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in d["runs"]:
    lines.append(
      f"| {r['gc_every']} | {r['train_seconds']:.1f} | {r['step_seconds']:.3f} | "
      f"{r['measurements']} | {r['gc_seconds']:.2f} | {_fmt(r['seconds_per_measurement'] or None, '.3f')} | "
      f"{_fmt(r['measurement_in_training_steps'] or None, '.2f')} |"
    )
  lines += [
    "",
    f"At `gc_every={on['gc_every']}` one measurement costs "
    f"{on['measurement_in_training_steps']:.2f} training steps, and its {on['measurements']} "
    "measurements together "
    f"{100 * on['gc_seconds'] / on['train_seconds']:.0f} % of the training time; a training "
    f"step took {on['step_seconds']:.3f} s against {off['step_seconds']:.3f} s with it off. "
    f"Run: {d['what']}. " + source_line(RESULTS / "gc_every_cost_cpu.json"),
  ]
  return "\n".join(lines)


def render_multiprocess():
  d = _load("multiprocess_cost_cpu.json")
  rows = {r["layout"]: r for r in d["rows"]}
  one = rows["1x2"]
  lines = [
    "| layout | processes x devices | first call s | step median ms | step min ms | median vs 1 x 2 | GC |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in d["rows"]:
    lines.append(
      f"| {r['layout']} | {r['processes']} x {r['devices_per_process']} | {r['first_call_s']:.1f} | "
      f"{r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} | "
      f"**{r['step_ms_median'] / one['step_ms_median']:.1f}x** | {r['gc']:.6f} |"
    )
  multi = [r for r in d["rows"] if r["processes"] > 1]
  same = all(r["gc"] == one["gc"] for r in d["rows"])
  lines += [
    "",
    f"{d['model']}, batch {d['batch']} (global). "
    + "; ".join(
      f"{r['processes']} processes x {r['devices_per_process']} device: the step's median is "
      f"{r['step_ms_median'] / one['step_ms_median']:.1f}x and its minimum "
      f"{r['step_ms_min'] / one['step_ms_min']:.1f}x that of 1 process x "
      f"{one['devices_per_process']} devices"
      for r in multi
    )
    + (", with the same GC." if same else "; **the GC differs**.")
    + " "
    + source_line(RESULTS / "multiprocess_cost_cpu.json"),
  ]
  return "\n".join(lines)


ONEDNN = ("onednn_prototype_cpu.json", "onednn_prototype_cpu_1thread.json")


def render_onednn():
  lines = [
    "| oneDNN threads | B | conv sum per step XLA ms | oneDNN ms | oneDNN / XLA | XLA step ms | PyTorch step ms | XLA / PyTorch | estimated step ms | **estimated / PyTorch** (target ≤ 1.0) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for n in ONEDNN:
    d = _load(n)
    threads = d["environment"].get("onednn_threads")
    for b, s in sorted(d["summary"].items(), key=lambda kv: int(kv[0])):
      lines.append(
        f"| {threads} | {b} | {s['xla_conv_ms']:.1f} | {s['onednn_conv_ms']:.1f} | "
        f"{s['conv_ratio']:.2f} | {s['xla_step_ms']:.1f} | {s['torch_step_ms']:.1f} | "
        f"{s['xla_vs_torch']:.2f} | {s['est_step_ms']:.1f} | **{s['est_vs_torch']:.2f}** "
        f"({'met' if s['meets_target'] else 'missed'}) |"
      )
  lines += [""] + [source_line(RESULTS / n) for n in ONEDNN]
  return "\n".join(lines)


def render_sites_compile():
  """`sites` against `segments`: lower + compile and step of the batch-setting NIO step."""
  out = []
  for name in FORMULATIONS:
    rows = list(bench_rows(name, parts=["nio_b"]))
    for model, b, _, form, j, _, _ in rows:
      if form.startswith("sites"):
        conv = form.split("/")[1]
        seg = next(r[4] for r in rows if r[1] == b and r[3] == f"segments/{conv}")
        comp = lambda x: (x.get("lower_s") or 0) + (x.get("compile_s") or 0)  # noqa: E731
        out.append(
          f"{model}, B={b}, conv={conv}: `sites` lowers and compiles in "
          f"{comp(j) / comp(seg):.2f}x the time of `segments` and steps in "
          f"{j['median_s'] / seg['median_s']:.2f}x its time"
        )
  return "; ".join(out) + ". " + " ".join(source_line(RESULTS / n) for n in FORMULATIONS)


LEVERS = ("levers_cpu.json", "levers_cpu_resnet110.json")
LEVERS_MALLOC = ("levers_cpu_malloc.json", "levers_cpu_malloc_resnet110.json")
LEVERS_HVP = ("levers_cpu_hvp.json",)
LEVERS_YNN_DOT = ("levers_cpu_ynn_dot.json", "levers_cpu_ynn_dot_rev.json")


def render_levers(names=LEVERS):
  """The levers of issue 30 (`benchmarks.levers`): each file's table and exactness line."""
  from benchmarks import levers  # noqa: PLC0415

  out = []
  for n in names:
    md = levers.render(_load(n)).splitlines()
    out += [ln for ln in md if ln.startswith("One step")] + [""]
    out += [ln for ln in md if ln.startswith("|")] + ["", source_line(RESULTS / n), ""]
  return "\n".join(out).strip()


FORMULATIONS = (
  latest("bench_*_cpu_formulations_b32.json"),
  latest("bench_*_cpu_formulations_b128.json"),
)
PROFILES = (
  "profile_resnet20_b32_cpu.json",
  "profile_resnet20_b32_cpu_sites-im2col.json",
  "profile_resnet20_bn_b32_cpu.json",
)


BLOCKS = {
  "demo": ([DEMO], render_demo),
  "perf-defaults": _bench_block(DEFAULTS_B32),
  "bench-b128": _bench_block(latest("bench_*_cpu_b128.json")),
  "bench-formulations": _bench_block(*FORMULATIONS, memory=False),
  "bench-bn": _bench_block(latest("bench_*_cpu_bn_formulations.json"), memory=False),
  "bench-searches": _bench_block(latest("bench_*_cpu_searches.json")),
  "compile-cache": (
    [
      RESULTS / n
      for n in (
        "compile_cache_cpu.json",
        "compile_cache_cpu_bn.json",
        "compile_cache_cpu_flags.json",
      )
    ],
    render_compile_cache,
  ),
  "memory": (
    [RESULTS / n for n in ("compile_cache_cpu.json", "compile_cache_cpu_bn.json", DEFAULTS_B32)],
    render_memory,
  ),
  "user-loop": ([RESULTS / "user_loop_cpu.json"], render_user_loop),
  "depth": ([RESULTS / n for n in DEPTH], lambda: render_user_loop(DEPTH)),
  "train-convs": ([RESULTS / n for n in TRAIN_CONVS], lambda: render_user_loop(TRAIN_CONVS)),
  "compile-time": ([RESULTS / "compile_time_cpu.json"], render_compile_time),
  "dispatch": ([RESULTS / "dispatch_overhead_cpu.json"], render_dispatch),
  "xla-flags": ([RESULTS / "xla_flags_cpu.json"], render_xla_flags),
  "profiles": ([RESULTS / n for n in PROFILES], render_profiles),
  "sweep-quiet": ([SWEEP / "runs"], render_quiet_cells),
  "sweep-rounds": ([ROUND1 / "runs", SWEEP / "runs"], render_rounds),
  "sweep-significant": ([SWEEP / "runs"], render_significant),
  "sweep-lsuv": ([SWEEP / "table.json"], render_lsuv_best_end),
  **{f"sweep-{m}": _sweep_block(m) for m in ("mlp20", "vgg19_nobn", "vgg19_bn", "vit_mini")},
  "sweep-resnet32_nobn": _sweep_block("resnet32_nobn", _resnet32_search_note),
  **{
    f"sweep-vs-kaiming-{m}": ([SWEEP / "runs"], (lambda m=m: render_vs_kaiming(m)))
    for m in ("mlp20", "resnet32_nobn", "vgg19_nobn", "vgg19_bn", "vit_mini")
  },
  "gc-every": ([RESULTS / "gc_every_cost_cpu.json"], render_gc_every),
  "multiprocess-cost": ([RESULTS / "multiprocess_cost_cpu.json"], render_multiprocess),
  "onednn-prototype": ([RESULTS / n for n in ONEDNN], render_onednn),
  "sites-compile": ([RESULTS / n for n in FORMULATIONS], render_sites_compile),
  "levers": ([RESULTS / n for n in LEVERS], render_levers),
  "levers-malloc": (
    [RESULTS / n for n in LEVERS_MALLOC],
    lambda: render_levers(LEVERS_MALLOC),
  ),
  "levers-hvp": ([RESULTS / n for n in LEVERS_HVP], lambda: render_levers(LEVERS_HVP)),
  "levers-ynn-dot": (
    [RESULTS / n for n in LEVERS_YNN_DOT],
    lambda: render_levers(LEVERS_YNN_DOT),
  ),
}


# ----------------------------------------------------------------------------- files


def marker(name: str) -> str:
  src = ", ".join(("benchmarks/results/" + rel(p)) for p in BLOCKS[name][0])
  return f"<!-- BEGIN generated {name} ({TOOL}; from {src}) -->"


def blocks_in(text: str) -> list[re.Match]:
  return list(MARK.finditer(text))


def render(text: str) -> str:
  """`text` with every generated block re-rendered (its marker rewritten from BLOCKS)."""

  def sub(m):
    name = m["name"]
    if name not in BLOCKS:
      raise KeyError(f"unknown generated block {name!r}; known: {sorted(BLOCKS)}")
    return f"{marker(name)}\n{BLOCKS[name][1]()}\n<!-- END generated {name} -->"

  return MARK.sub(sub, text)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true", help="only report stale blocks (exit 1)")
  a = ap.parse_args(argv)
  stale = []
  for path in DOCS:
    text = path.read_text()
    new = render(text)
    if new != text:
      stale.append(str(path.relative_to(REPO)))
      if not a.check:
        path.write_text(new)
  if not a.check:
    png = render_demo_picture()
    print(f"[docs_figures] rewrote {len(stale)} file(s)" + (f"; picture {png}" if png else ""))
    return 0
  for s in stale:
    print(f"stale: {s}")
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
