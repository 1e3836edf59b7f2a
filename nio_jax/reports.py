"""Reports of run directories: a markdown table (accuracies, timings, GC before/after) and
PNG plots (training curves, search curves, learned per-layer scales). Used by
`nio-jax report` and at the end of `nio-jax train`."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from nio_jax import files, methods
from nio_jax.files import RUN_RECORD, read_json
from nio_jax.train.metrics import gc_records, read_metrics


def pyplot():
  """matplotlib.pyplot with a non-interactive backend (imported on first use: optional)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def save_figure(fig, path, dpi: int = 100) -> pathlib.Path:
  """Lays out, writes (process 0 only in a multi-process run) and closes a matplotlib
  figure; returns its path."""
  fig.tight_layout()
  if files.is_primary():
    fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return pathlib.Path(path)


def _write_text(path: pathlib.Path, text: str) -> None:
  files.written_by_primary(path, lambda: path.write_text(text))


def fmt(x, spec=".4f") -> str:
  """`x` formatted with `spec` when a float, "-" when None, else `str(x)`."""
  if x is None:
    return "-"
  if isinstance(x, float):
    return format(x, spec)
  return str(x)


def gc_table(measurements: dict, label: str = "") -> str:
  """Markdown table of `nio_jax.measure` results `{row name: result or None}` (None rows are
  left out; a result with "error" shows the error)."""
  rows = [f"| {label} | GC (B-GC) | gradient norm | loss |", "|---|---|---|---|"]
  for name, m in measurements.items():
    if m is None:
      continue
    if "error" in m:
      rows.append(f"| {name} | error: {m['error']} | | |")
      continue
    rows.append(
      f"| {name} | {m['gc']:.4f} ± {m['gc_std']:.4f} | "
      f"{m['grad_norm']:.4f} ± {m['grad_norm_std']:.4f} | {m['loss']:.4f} |"
    )
  return "\n".join(rows)


def before_after_table(before, after) -> str:
  """`gc_table` of the GC report before and after an initialisation."""
  return gc_table({"before": before, "after": after})


def _given(value, fallback):
  """`value`, or `fallback` when it is None."""
  return fallback if value is None else value


def run_summary(d: pathlib.Path) -> dict:
  """What a run directory says: its run record (`run_record.json`), config, metrics log and
  the method's history (`init_history.json`); every field may be missing (the accuracies
  then come from the metrics log, e.g. of a run trained with `nio_jax.train.train` alone).

  The GC report and the method's time come from the run record; a directory of
  `nio-jax init` alone has none, and its record is `init_report.json`."""
  cfg = read_json(d / "config.json") or {}
  recs = read_metrics(d / "metrics.jsonl")
  evals = [r for r in recs if r.get("type") == "eval"]
  hist = read_json(d / "init_history.json") or {}
  rec = read_json(d / RUN_RECORD)
  if rec is None:  # `nio-jax init` alone: its record is the init report
    rep = read_json(d / "init_report.json") or {}
    rec = {k: rep.get(k) for k in ("model", "method", "before", "after")}
    rec.update(dataset=rep.get("dataset"), search_seconds=rep.get("seconds"))
  times = [r["epoch_time"] for r in evals if r.get("epoch_time") is not None]
  pub = cfg.get("published") or {}
  pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
  return {
    "run": d.name,
    "dir": str(d),
    "model": (cfg.get("model") or {}).get("name", rec.get("model")),
    "dataset": (cfg.get("data") or {}).get("dataset", rec.get("dataset")),
    "method": (cfg.get("init") or {}).get("method", rec.get("method", hist.get("method"))),
    "baseline": (cfg.get("train") or {}).get("baseline"),
    "init_s": rec.get("search_seconds"),
    "epoch1_s": times[0] if times else None,
    "epoch_s": (
      sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else (times[0] if times else None)
    ),
    "epochs": len(evals),
    "acc_1": pct(_given(rec.get("acc_1"), evals[0]["test_acc"] if evals else None)),
    "acc_best": pct(_given(rec.get("acc_best"), max((r["test_acc"] for r in evals), default=None))),
    "final": pct(_given(rec.get("final_test_acc"), evals[-1]["test_acc"] if evals else None)),
    "before": rec.get("before"),
    "after": rec.get("after"),
    "pub_acc_1": pub.get("acc_1"),
    "pub_acc_best": pub.get("acc_best"),
    "history": hist.get("history") or {},
    "evals": evals,
    "train": [r for r in recs if r.get("type") == "train"],
    "scales": read_json(d / "scales.json"),
    "gc": gc_records(recs),
  }


def _gc(m, key):
  if not m or "error" in m:
    return None
  return m.get(key)


def summary_table(rows: list[dict]) -> str:
  """Markdown table of `run_summary` rows: timings, accuracies, GC before → after and the
  published numbers."""
  head = (
    "| run | model | data | method | baseline | init (s) | epoch 1 (s) | epoch (s) | "
    "Acc_1 (%) | Acc_best (%) | final (%) | GC before→after | grad norm before→after | "
    "published Acc_1/Acc_best |"
  )
  lines = [head, "|" + "---|" * 14]
  for r in rows:
    gc = f"{fmt(_gc(r['before'], 'gc'), '.3f')}→{fmt(_gc(r['after'], 'gc'), '.3f')}"
    gn = f"{fmt(_gc(r['before'], 'grad_norm'), '.3f')}→{fmt(_gc(r['after'], 'grad_norm'), '.3f')}"
    pub = (
      f"{fmt(r['pub_acc_1'], '.1f')}/{fmt(r['pub_acc_best'], '.1f')}"
      if r["pub_acc_1"] is not None or r["pub_acc_best"] is not None
      else "-"
    )
    lines.append(
      f"| {r['run']} | {fmt(r['model'])} | {fmt(r['dataset'])} | {fmt(r['method'])} | "
      f"{fmt(r['baseline'])} | {fmt(r['init_s'], '.1f')} | {fmt(r['epoch1_s'], '.1f')} | "
      f"{fmt(r['epoch_s'], '.1f')} | {fmt(r['acc_1'], '.2f')} | {fmt(r['acc_best'], '.2f')} | "
      f"{fmt(r['final'], '.2f')} | {gc} | {gn} | {pub} |"
    )
  return "\n".join(lines)


def gc_points(gc: dict, key: str = "gc") -> tuple[list[int], list[float]]:
  """(steps, values of `key`) of a run's `train.gc_every` measurements `{step: measurement}`
  (failed measurements, with `error`, are left out)."""
  pts = sorted((int(s), m[key]) for s, m in (gc or {}).items() if m.get(key) is not None)
  return [p[0] for p in pts], [p[1] for p in pts]


def gc_tracking_text(r: dict) -> str | None:
  """One line on a run's GradCosine during training (`train.gc_every`), or None."""
  steps, gcs = gc_points(r.get("gc"))
  if not steps:
    return None
  gn = dict(zip(*gc_points(r["gc"], "grad_norm")))
  i = int(np.argmax(gcs))
  secs = sum(m.get("seconds") or 0.0 for m in r["gc"].values())
  failed = len(r["gc"]) - len(steps)
  return (
    f"GC during training ({len(steps)} measurements, `train.gc_every`): {gcs[0]:.4f} at step "
    f"{steps[0]} → {gcs[-1]:.4f} at step {steps[-1]} (highest {gcs[i]:.4f} at step "
    f"{steps[i]}); gradient norm {fmt(gn.get(steps[0]), '.4f')} → "
    f"{fmt(gn.get(steps[-1]), '.4f')}; {secs:.2f} s of measurement"
    + (f"; {failed} failed" if failed else "")
    + "."
  )


def plot_training(rows, path) -> pathlib.Path | None:
  """Training loss and test accuracy against epoch; with `train.gc_every` records, also
  GradCosine and gradient norm against the training step."""
  rows = [r for r in rows if r["evals"] or r["train"] or gc_points(r.get("gc"))[0]]
  if not rows:
    return None
  gc_rows = [r for r in rows if gc_points(r.get("gc"))[0]]
  plt = pyplot()
  n = 4 if gc_rows else 2
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8))
  for ax, key, title in zip(axes[2:], ("gc", "grad_norm"), ("GradCosine", "gradient norm")):
    for r in gc_rows:
      ax.plot(*gc_points(r["gc"], key), ".-", label=r["run"])
    ax.set(xlabel="training step", ylabel=title, title=f"{title} during training")
  for r in rows:
    if r["train"]:
      axes[0].plot(
        [t["epoch"] for t in r["train"]], [t["loss"] for t in r["train"]], lw=1, label=r["run"]
      )
    if r["evals"]:
      axes[1].plot(
        [e["epoch"] for e in r["evals"]],
        [100 * e["test_acc"] for e in r["evals"]],
        "o-",
        label=r["run"],
      )
  axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
  axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:  # e.g. no epoch evaluation in a short run
      ax.legend(fontsize=8)
  return save_figure(fig, path)


def plot_search(rows, path) -> pathlib.Path | None:
  """The search curves (GC, gradient norm, objective, GQ, loss per step) of the runs that
  have a search history; None when none has."""
  keys = ("gc", "grad_norm", "objective", "gq", "loss")
  rows = [r for r in rows if any(k in r["history"] for k in keys)]
  if not rows:
    return None
  present = [k for k in keys if any(k in r["history"] for r in rows)]
  plt = pyplot()
  fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
  for ax, k in zip(axes[0], present):
    for r in rows:
      if k in r["history"]:
        v = np.asarray(r["history"][k], np.float64)
        v = v.reshape(v.shape[0], -1).mean(-1) if v.ndim > 1 else v
        ax.plot(np.arange(len(v)), v, lw=1.2, label=f"{r['run']} ({r['method']})")
    ax.set(
      xlabel="search step",
      title={"gc": "GradCosine", "grad_norm": "gradient norm", "gq": "gradient quotient"}.get(k, k),
    )
    ax.legend(fontsize=7)
  return save_figure(fig, path)


def plot_scales(r, path) -> pathlib.Path | None:
  """A bar plot of one run's learned per-layer scales; None when it has none."""
  sc = r.get("scales")
  if not sc:
    return None
  names, vals = [], []
  for k, v in sc.items():
    a = np.asarray(v, np.float64).ravel()
    if a.size == 1:
      names.append(k), vals.append(float(a[0]))
    else:
      for i, x in enumerate(a):
        names.append(f"{k}[{i}]"), vals.append(float(x))
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(vals) + 2), 4.2))
  ax.bar(np.arange(len(vals)), vals)
  ax.axhline(1.0, color="k", lw=0.8, ls="--")
  ax.set_xticks(np.arange(len(vals)))
  ax.set_xticklabels(names, rotation=90, fontsize=6 if len(vals) > 30 else 8)
  ax.set(ylabel="scale", title=f"per-layer scales after the search: {r['run']} ({r['method']})")
  return save_figure(fig, path)


def report(dirs: Sequence[pathlib.Path], out: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
  """Markdown table + PNGs (training curves, search curves, per-layer scales) for run dirs;
  writes `out/report.md` and returns (markdown, plot paths)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rows = [run_summary(pathlib.Path(d)) for d in dirs]
  plots = []
  p = plot_training(rows, out / "report_training.png")
  plots += [p] if p else []
  p = plot_search(rows, out / "report_search.png")
  plots += [p] if p else []
  for r in rows:
    p = plot_scales(
      r, out / (f"report_scales_{r['run']}.png" if len(rows) > 1 else "report_scales.png")
    )
    plots += [p] if p else []
  for d in dirs:
    c = pathlib.Path(d) / "curves.png"
    if c.exists():
      plots.append(c)
  text = (
    "## Runs\n\n" + summary_table(rows) + "\n\nAcc in %. init (s) = wall time of the "
    "initialisation method including compilation; epoch 1 includes compilation, epoch = "
    "median of the later epochs.\n"
  )
  for r in rows:
    if r["before"] or r["after"]:
      text += (
        f"\n### {r['run']}: before / after {r['method']}\n\n"
        + before_after_table(r["before"], r["after"])
        + "\n"
      )
    line = gc_tracking_text(r)
    if line:
      text += f"\n### {r['run']}: GradCosine during training\n\n{line}\n"
  text += "\n" + "\n".join(f"![{p.name}]({os.path.relpath(p, out)})" for p in plots) + "\n"
  _write_text(out / "report.md", text)
  return text, plots


# --------------------------------------------------------------------------------------------
# `nio-jax compare`: several methods on one config
# --------------------------------------------------------------------------------------------


def method_label(method: str) -> str:
  """The display name of a method ("nio" -> "NIO"): its registered `Method.label`; an
  unknown name (e.g. a record of a method no longer registered) shows as it is."""
  try:
    return methods.get_method(method).label
  except ValueError:
    return method


def _curve(record: dict) -> tuple[list[int], list[float]]:
  """(steps, test accuracy in %) of a run record's `acc_steps`, sorted by step."""
  pts = sorted((int(k), 100.0 * float(v)) for k, v in (record.get("acc_steps") or {}).items())
  return [p[0] for p in pts], [p[1] for p in pts]


def compare_table(out: dict) -> str:
  """Markdown table of a `experiment.compare_run` result: search cost, GC and gradient norm
  before → after the search, and the test accuracy at every evaluated step."""
  recs = out["records"]
  steps = sorted({s for r in recs.values() for s in _curve(r)[0]})
  head = "| method | search steps | search (s) | GC before → after | grad norm before → after | "
  head += " | ".join(f"acc@{s} (%)" for s in steps) + " |"
  lines = [head, "|" + "---|" * (5 + len(steps))]
  for m in out["methods"]:
    r = recs[m]
    acc = dict(zip(*_curve(r)))
    gc = f"{fmt(_gc(r.get('before'), 'gc'), '.3f')} → {fmt(_gc(r.get('after'), 'gc'), '.3f')}"
    gn = (
      f"{fmt(_gc(r.get('before'), 'grad_norm'), '.3f')} → "
      f"{fmt(_gc(r.get('after'), 'grad_norm'), '.3f')}"
    )
    search = r.get("search_seconds") if r.get("search_steps") else None
    lines.append(
      f"| {method_label(m)} | {fmt(r.get('search_steps') or 0)} | {fmt(search, '.1f')} | "
      f"{gc} | {gn} | " + " | ".join(fmt(acc.get(s), ".1f") for s in steps) + " |"
    )
  return "\n".join(lines)


def compare_sentence(out: dict, baseline: str = "kaiming") -> str:
  """One sentence that reads a comparison: each method's test accuracy against the
  baseline's at the first and the last evaluated step, and who leads at each."""
  recs = out["records"]
  curves = {m: dict(zip(*_curve(recs[m]))) for m in out["methods"]}
  steps = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
  if not steps:
    return "No evaluation step is common to every run: nothing to compare."
  parts = []
  for s in dict.fromkeys((steps[0], steps[len(steps) // 2], steps[-1])):
    lead = max(out["methods"], key=lambda m, s=s: curves[m][s])
    vals = ", ".join(f"{method_label(m)} {curves[m][s]:.1f} %" for m in out["methods"])
    parts.append(f"after {s} steps {vals} ({method_label(lead)} leads)")
  text = "Test accuracy " + "; ".join(parts) + "."
  if baseline in curves:
    others = [m for m in out["methods"] if m != baseline]
    ahead = {m: [s for s in steps if curves[m][s] > curves[baseline][s]] for m in others}
    text += " " + " ".join(
      f"{method_label(m)} is ahead of {method_label(baseline)} at {len(ahead[m])} of "
      f"{len(steps)} evaluations."
      for m in others
    )
  return text


def plot_compare(out: dict, path) -> pathlib.Path:
  """One picture: the test-accuracy curves of every method, and GC and gradient norm
  before and after each search."""
  plt = pyplot()
  recs, names = out["records"], out["methods"]
  fig, axes = plt.subplots(
    1, 3, figsize=(14, 4.0), gridspec_kw={"width_ratios": [2.2, 1, 1]}, squeeze=True
  )
  for m in names:
    s, a = _curve(recs[m])
    axes[0].plot(s, a, "o-", lw=1.5, ms=4, label=method_label(m))
  axes[0].set(xlabel="training step", ylabel="test accuracy (%)", title="test accuracy")
  axes[0].legend(fontsize=9)
  axes[0].grid(alpha=0.3)
  x = np.arange(len(names))
  for ax, key, title in ((axes[1], "gc", "GradCosine"), (axes[2], "grad_norm", "gradient norm")):
    b = [_gc(recs[m].get("before"), key) for m in names]
    a = [_gc(recs[m].get("after"), key) for m in names]
    ax.bar(x - 0.2, [np.nan if v is None else v for v in b], 0.4, label="before search")
    ax.bar(x + 0.2, [np.nan if v is None else v for v in a], 0.4, label="after search")
    ax.set_xticks(x)
    ax.set_xticklabels([method_label(m) for m in names])
    ax.set(title=f"{title} at initialisation")
    ax.legend(fontsize=8, loc="lower center", framealpha=0.9)
  return save_figure(fig, path)


def compare_report(out: dict, workdir, *, title: str = "") -> tuple[str, pathlib.Path]:
  """Writes `compare.md` (table + sentence + picture) and `compare.png` for a
  `experiment.compare_run` result; returns (markdown, picture path)."""
  workdir = pathlib.Path(workdir)
  png = plot_compare(out, workdir / "compare.png")
  text = (
    (f"## {title}\n\n" if title else "")
    + compare_table(out)
    + "\n\n"
    + compare_sentence(out)
    + "\n\nGC and gradient norm: `nio_jax.measure` on the same batches before and after "
    "each search (Kaiming has no search: before = after). Search (s) includes compilation."
    f"\n\n![{png.name}]({png.name})\n"
  )
  _write_text(workdir / "compare.md", text)
  return text, png
