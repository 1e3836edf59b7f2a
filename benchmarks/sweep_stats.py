"""Verdict tables of a sweep, generated from its per-run JSON only (no run is started).

    python -m benchmarks.sweep_stats                  # writes sweep_fmnist/significant.md

For each model (the grid's order), method and evaluation point (Acc@k on the fixed test
subset, the epoch ends Acc_e before the last, and the end of the run on the whole test set):

1. :func:`summaries`: mean ± sample std, median and count over seeds, and how many seeds are
   still near chance (test accuracy < :data:`CHANCE`) at step :data:`CHANCE_STEP`;
2. :func:`significant_cells`: every (model, method, point) whose mean differs from Kaiming's
   by more than the sum of the two sample stds (:func:`spread_rule`, docs/results.md's rule),
   better or worse, so that the prose cannot miss one;
3. :func:`sign_tests`: the paired comparison with Kaiming seed by seed (seed k of every
   method has the same data order): wins, losses and ties, and the two-sided exact sign test
   (:func:`sign_test_p`, ties dropped).

`tests/test_sweep_stats.py` checks that the committed `significant.md` equals what the
generator renders from the committed JSON; the same table of significant cells is a generated
block of docs/results.md (`benchmarks.docs_figures`, :func:`significance_table`).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINE = "kaiming"
CHANCE = 0.20  # near chance: 10 classes, so 10 % is chance; < 20 % has not started to learn
CHANCE_STEP = 100


def load_runs(runs_dir) -> list[dict]:
  """The finished per-run records `<runs_dir>/<model>__<method>__seed<k>.json`, by file name."""
  out = []
  for path in sorted(pathlib.Path(runs_dir).glob("*__*__seed*.json")):
    rec = json.loads(path.read_text())
    if rec.get("finished"):
      out.append(rec)
  return out


def grid_order(grid: dict) -> list[tuple[str, str]]:
  """The (model, method) order of a sweep grid's cells."""
  return [(c["model"], c["method"]) for c in grid["cells"]]


def by_cell(records: list[dict], order=None) -> dict[str, dict[str, list[dict]]]:
  """`{model: {method: [records by seed]}}` in `order` (the grid's), unknown cells after it."""
  cells: dict[tuple[str, str], list[dict]] = {}
  for r in records:
    cells.setdefault((r["cell_model"], r["cell_method"]), []).append(r)
  keys = [k for k in (order or []) if k in cells]
  keys += sorted(k for k in cells if k not in keys)
  out: dict = {}
  for model, method in keys:
    out.setdefault(model, {})[method] = sorted(cells[(model, method)], key=lambda r: r["seed"])
  return out


def points(records: list[dict]) -> list[str]:
  """The evaluation points of one model's records: `Acc@k` for every step evaluated on the
  subset (the last step excluded), `Acc_e` for the epoch ends before the last, and `end`."""
  # a run that diverged (in its search or its training) has no last step
  done = [int(r["step"]) for r in records if r.get("step") is not None]
  last = max(done) if done else 0
  steps = sorted({int(k) for r in records for k in r["acc_steps"] if int(k) < last})
  n_ep = max(len(r["acc_epochs"]) for r in records)
  return [f"Acc@{k}" for k in steps] + [f"Acc_{e}" for e in range(1, n_ep)] + ["end"]


def value(record: dict, point: str) -> float | None:
  """The test accuracy (fraction) of one run at a point of :func:`points`, None if missing."""
  if point == "end":
    return record.get("final_test_acc")
  if point.startswith("Acc@"):
    return record["acc_steps"].get(point[4:])
  e = int(point[4:])
  return record["acc_epochs"][e - 1] if len(record["acc_epochs"]) >= e else None


def summary(vals) -> dict:
  """`{"n", "mean", "std", "median"}` of the non-missing values (sample std, ddof 1; 0 for one
  value; None for none), computed as `benchmarks.sweep.mean_std` does (numpy, float64), so
  the figures round as in `table.md`."""
  v = [float(x) for x in vals if x is not None and math.isfinite(x)]
  if not v:
    return {"n": 0, "mean": None, "std": None, "median": None}
  a = np.asarray(v, np.float64)
  return {
    "n": len(v),
    "mean": float(a.mean()),
    "std": float(a.std(ddof=1)) if len(v) > 1 else 0.0,
    "median": float(np.median(a)),
  }


def spread_rule(a: dict, base: dict) -> int:
  """The spread rule (docs/results.md): +1 when `a`'s mean exceeds `base`'s by more than the
  sum of the two sample stds, -1 when it falls short by more than that, 0 otherwise (also
  when either side has fewer than two values, whose std says nothing)."""
  if a["n"] < 2 or base["n"] < 2:
    return 0
  diff, spread = a["mean"] - base["mean"], a["std"] + base["std"]
  return 1 if diff > spread else (-1 if -diff > spread else 0)


def sign_test_p(wins: int, losses: int) -> float:
  """Two-sided exact sign test (binomial, p = 1/2) of `wins` against `losses` (ties dropped):
  `min(1, 2 * P[X <= min(wins, losses)])` for X ~ Binomial(wins + losses, 1/2); 1 for none."""
  n = wins + losses
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
  return min(1.0, 2.0 * tail)


def summaries(records: list[dict], order=None) -> dict:
  """`{model: {"points", "methods": {method: {"seeds", point: summary, "near_chance"}}}}`;
  `near_chance` = seeds below :data:`CHANCE` at step :data:`CHANCE_STEP` (None: not
  evaluated there)."""
  out = {}
  for model, methods in by_cell(records, order).items():
    pts = points([r for rs in methods.values() for r in rs])
    rows = {}
    for method, rs in methods.items():
      row = {"seeds": [r["seed"] for r in rs]}
      for p in pts:
        row[p] = summary([value(r, p) for r in rs])
      at = [r["acc_steps"].get(str(CHANCE_STEP)) for r in rs]
      at = [a for a in at if a is not None]
      row["near_chance"] = sum(a < CHANCE for a in at) if at else None
      rows[method] = row
    out[model] = {"points": pts, "methods": rows}
  return out


def significant_cells(summ: dict) -> list[dict]:
  """Every (model, method, point) that :func:`spread_rule` separates from Kaiming, in order:
  `{"model", "method", "point", "method_stats", "kaiming_stats", "diff", "spread", "verdict"}`
  with `verdict` "better" or "worse" (differences in accuracy fractions)."""
  out = []
  for model, m in summ.items():
    base = m["methods"].get(BASELINE)
    if base is None:
      continue
    for method, row in m["methods"].items():
      if method == BASELINE:
        continue
      for p in m["points"]:
        s = spread_rule(row[p], base[p])
        if s:
          out.append(
            {
              "model": model,
              "method": method,
              "point": p,
              "method_stats": row[p],
              "kaiming_stats": base[p],
              "diff": row[p]["mean"] - base[p]["mean"],
              "spread": row[p]["std"] + base[p]["std"],
              "verdict": "better" if s > 0 else "worse",
            }
          )
  return out


def sign_tests(records: list[dict], order=None) -> dict:
  """`{model: {"points", "methods": {method: {point: {"wins", "losses", "ties", "p"}}}}}`: each
  method against Kaiming on the seeds both ran (same seed = same data order)."""
  out = {}
  for model, methods in by_cell(records, order).items():
    base = {r["seed"]: r for r in methods.get(BASELINE, [])}
    if not base:
      continue
    pts = points([r for rs in methods.values() for r in rs])
    rows = {}
    for method, rs in methods.items():
      if method == BASELINE:
        continue
      row = {}
      for p in pts:
        w = lo = t = 0
        for r in rs:
          if r["seed"] not in base:
            continue
          a, b = value(r, p), value(base[r["seed"]], p)
          if a is None or b is None:
            continue
          w, lo, t = w + (a > b), lo + (a < b), t + (a == b)
        row[p] = {"wins": w, "losses": lo, "ties": t, "p": sign_test_p(w, lo)}
      rows[method] = row
    out[model] = {"points": pts, "methods": rows}
  return out


def pct(s: dict, median: bool = False) -> str:
  if s["mean"] is None:
    return "–"
  txt = f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s["n"] > 1 else f"{100 * s['mean']:.1f}"
  return txt + (f" ({100 * s['median']:.1f})" if median else "")


def significant_table(cells: list[dict]) -> str:
  """The Markdown table of :func:`significant_cells` (a generated block of docs/results.md)."""
  lines = [
    "| model | method | point | method (%) | kaiming (%) | difference | summed std | verdict |",
    "|---|---|---|---|---|---:|---:|---|",
  ]
  for c in cells:
    lines.append(
      f"| {c['model']} | {c['method']} | {c['point']} | {pct(c['method_stats'])} | "
      f"{pct(c['kaiming_stats'])} | {100 * c['diff']:+.2f} | {100 * c['spread']:.2f} | "
      f"**{c['verdict']}** |"
    )
  if not cells:
    lines.append("| – | – | – | – | – | – | – | none |")
  return "\n".join(lines)


def _quiet_counts(rs: list[dict]) -> str:
  v = [(r.get("quiet") or {}).get("verdict") for r in rs]
  return f"QUIET {v.count('QUIET')}, NOISY {v.count('NOISY')}, not recorded {v.count(None)}"


def markdown(records: list[dict], order=None, title: str = "fmnist") -> str:
  """`significant.md`: the significant cells, the per-model summaries and the sign tests."""
  summ = summaries(records, order)
  cells = significant_cells(summ)
  signs = sign_tests(records, order)
  better = sum(c["verdict"] == "better" for c in cells)
  lines = [
    f"# Sweep `{title}`: every difference from Kaiming, and the paired comparisons",
    "",
    "Generated by `python -m benchmarks.sweep_stats` from the per-run JSON in `runs/` "
    f"({len(records)} finished runs); do not edit. Test accuracy in %. Points: Acc@k after "
    "k steps on the fixed 2,000-image test subset; Acc_e at the end of epoch e; end = the "
    "last step on the whole test set (step 300; for `mlp20` step 1,404 = Acc_3).",
    "",
    "## Differences from Kaiming larger than the seed spread",
    "",
    "The rule: |mean − mean of Kaiming| > std + std of Kaiming (sample stds over seeds; both "
    f"sides need at least 2 seeds). {len(cells)} cells pass it: {better} better than Kaiming, "
    f"{len(cells) - better} worse. Difference and summed std in points.",
    "",
    significant_table(cells),
    "",
    "## Per method: mean ± std (median) over seeds",
    "",
    f"Near chance: seeds below {100 * CHANCE:.0f} % at step {CHANCE_STEP}. Quiet: the runs' "
    "own verdicts (other processes' share of the machine over the run, NOISY above 5 %); "
    "runs made before the sweep recorded them have none.",
    "",
  ]
  for model, m in summ.items():
    pts = m["points"]
    rs_all = [r for r in records if r["cell_model"] == model]
    head = ["method", "seeds", *pts, f"near chance @{CHANCE_STEP}"]
    lines += [
      f"### {model}",
      "",
      f"Quiet verdicts of its {len(rs_all)} runs: {_quiet_counts(rs_all)}.",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * len(head),
    ]
    for method, row in m["methods"].items():
      nc = row["near_chance"]
      n100 = row.get(f"Acc@{CHANCE_STEP}", {}).get("n", 0)
      lines.append(
        "| "
        + " | ".join(
          [
            method,
            str(len(row["seeds"])),
            *[pct(row[p], median=True) for p in pts],
            "–" if nc is None else f"{nc} of {n100}",
          ]
        )
        + " |"
      )
    lines.append("")
  lines += [
    "## Paired with Kaiming, seed by seed",
    "",
    "Seed k of every method has the same data order as Kaiming's seed k. Each entry: wins – "
    "losses against Kaiming on the seeds both ran (ties, if any, in parentheses) and the "
    "two-sided exact sign test p-value (binomial with p = 1/2, ties dropped; with 3 seeds the "
    "smallest possible p is 0.25, with 5 seeds 0.0625, with 8 seeds 0.0078).",
    "",
  ]
  for model, m in signs.items():
    pts = m["points"]
    lines += [
      f"### {model}",
      "",
      "| method | " + " | ".join(pts) + " |",
      "|" + "---|" * (1 + len(pts)),
    ]
    for method, row in m["methods"].items():
      ent = []
      for p in pts:
        s = row[p]
        ties = f" ({s['ties']} tied)" if s["ties"] else ""
        ent.append(f"{s['wins']}–{s['losses']}{ties}, p {s['p']:.3g}")
      lines.append(f"| {method} | " + " | ".join(ent) + " |")
    lines.append("")
  return "\n".join(lines)


def significance_table(records: list[dict], order=None) -> str:
  """The table of every (model, method, point) the spread rule separates from Kaiming."""
  return significant_table(significant_cells(summaries(records, order)))


def write(grid: dict, results=RESULTS) -> pathlib.Path:
  """Writes `<results>/sweep_<grid>/significant.md` from its `runs/`."""
  out = pathlib.Path(results) / f"sweep_{grid['name']}"
  records = load_runs(out / "runs")
  path = out / "significant.md"
  path.write_text(markdown(records, grid_order(grid), grid["name"]))
  return path


def main(argv=None) -> int:
  from benchmarks import sweep  # noqa: PLC0415

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--grid", default="fmnist")
  p.add_argument("--results", default=str(RESULTS))
  a = p.parse_args(argv)
  path = write(sweep.load_grid(a.grid), a.results)
  print(f"[sweep_stats] wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
