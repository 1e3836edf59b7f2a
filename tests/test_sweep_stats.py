"""The sweep's verdict tables (`benchmarks.sweep_stats`): the committed `significant.md`
equals what the generator renders from the committed per-run JSON (the same table in
docs/results.md is a `benchmarks.docs_figures` block, checked by tests/test_doc_figures.py);
the significance rule, the sign test, the medians and the near-chance counts on the first
round's JSON and on synthetic numbers."""

import math
import pathlib

import pytest

from benchmarks import sweep, sweep_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "results" / "sweep_fmnist"
ROUND1 = ROOT / "benchmarks" / "results" / "sweep_fmnist_round1"  # the grid's first round


def _run(model, method, seed, accs, end, epochs=()):
  """A per-run record with `acc_steps` {50, 100, 200} = `accs` and the end at step 300."""
  steps = {str(k): a for k, a in zip((50, 100, 200), accs, strict=True)}
  return {
    "cell_model": model,
    "cell_method": method,
    "seed": seed,
    "finished": True,
    "status": "finished",
    "step": 1404 if epochs else 300,
    "acc_steps": steps if epochs else {**steps, "300": end},
    "acc_epochs": list(epochs),
    "final_test_acc": end,
  }


def test_committed_significance_table_equals_what_the_generator_renders():
  """`significant.md` holds only what the generator renders from the committed JSON
  (regenerate: `python -m benchmarks.sweep_stats`)."""
  grid = sweep.load_grid("fmnist")
  records = sweep_stats.load_runs(SWEEP / "runs")
  order = sweep_stats.grid_order(grid)
  assert records, "no committed per-run JSON"
  md = sweep_stats.markdown(records, order, grid["name"])
  assert (SWEEP / "significant.md").read_text() == md, "python -m benchmarks.sweep_stats"


def test_the_first_round_names_the_worse_cells_of_issue_14():
  """The cells issue 14 found worse than Kaiming by the spread rule, in the first round's
  JSON (the data it read, kept beside the rerun), with its figures."""
  records = sweep_stats.load_runs(ROUND1 / "runs")
  assert records, "no first-round per-run JSON in benchmarks/results/sweep_fmnist_round1/runs"
  cells = sweep_stats.significant_cells(sweep_stats.summaries(records))
  got = {(c["model"], c["method"], c["point"]): c for c in cells}
  for key in [
    ("vgg19_nobn", "warmup", "Acc@50"),
    ("vgg19_nobn", "metainit", "Acc@50"),
    ("vgg19_nobn", "metainit", "Acc@200"),
    ("mlp20", "metainit", "Acc@50"),
    ("mlp20", "metainit", "Acc@100"),
    ("mlp20", "metainit", "Acc@200"),
    ("mlp20", "metainit", "Acc_1"),
    ("mlp20", "metainit", "Acc_2"),
  ]:
    assert got[key]["verdict"] == "worse", key
  c = got[("vgg19_nobn", "warmup", "Acc@50")]
  assert round(100 * c["diff"], 2) == -17.85 and round(100 * c["spread"], 2) == 13.45


def test_spread_rule_both_ways_and_with_too_few_seeds():
  s = sweep_stats.summary
  base = s([0.50, 0.60])  # mean 0.55, std 0.0707
  assert sweep_stats.spread_rule(s([0.80, 0.90]), base) == 1
  assert sweep_stats.spread_rule(s([0.20, 0.30]), base) == -1
  assert sweep_stats.spread_rule(s([0.62, 0.72]), base) == 0  # +0.12 < 0.141
  assert sweep_stats.spread_rule(s([0.90]), base) == 0  # one seed: no std, no verdict
  # Exactly the summed spread is not more than it.
  assert (
    sweep_stats.spread_rule({"n": 3, "mean": 0.7, "std": 0.05}, {"n": 3, "mean": 0.6, "std": 0.05})
    == 0
  )


def test_summary_mean_std_median():
  r = sweep_stats.summary([0.1, 0.2, 0.6, None, float("nan")])
  assert r["n"] == 3 and r["mean"] == pytest.approx(0.3) and r["median"] == pytest.approx(0.2)
  assert r["std"] == pytest.approx(math.sqrt(((0.2) ** 2 + 0.1**2 + 0.3**2) / 2))
  assert sweep_stats.summary([None])["mean"] is None
  assert sweep_stats.summary([0.4])["std"] == 0.0


def test_sign_test_p_exact_two_sided():
  p = sweep_stats.sign_test_p
  assert p(8, 0) == pytest.approx(2 / 256) and p(0, 8) == p(8, 0)
  assert p(3, 0) == 0.25 and p(5, 0) == 0.0625
  assert p(7, 1) == pytest.approx(2 * 9 / 256)
  assert p(6, 2) == pytest.approx(2 * (1 + 8 + 28) / 256)
  assert p(4, 4) == 1.0 and p(2, 1) == 1.0 and p(0, 0) == 1.0


def test_tables_on_a_synthetic_grid():
  """Means, medians, near-chance counts, the significant cells (better and worse) and the
  paired sign counts with ties, for a 3-epoch model and a 300-step one."""
  recs = []
  for seed, k in enumerate([0.12, 0.70, 0.75]):  # kaiming: one seed near chance at step 100
    recs.append(_run("net", "kaiming", seed, [0.10, k, 0.60], 0.70))
    recs.append(_run("net", "good", seed, [0.40, 0.70 + 0.01 * seed, 0.75], 0.70 + 0.01 * seed))
    recs.append(_run("net", "bad", seed, [0.05, 0.10, 0.20 + 0.01 * seed], 0.65))
  recs.append(_run("net", "good", 5, [0.40, 0.70, 0.75], 0.72))  # no Kaiming seed 5: unpaired
  for seed in range(3):
    recs.append(_run("mlp", "kaiming", seed, [0.5, 0.6, 0.7], 0.8, [0.7, 0.75, 0.8]))
    recs.append(_run("mlp", "slow", seed, [0.3, 0.4, 0.5], 0.8, [0.6 + seed / 100, 0.75, 0.8]))
  order = [("net", "kaiming"), ("net", "good"), ("net", "bad"), ("mlp", "kaiming")]
  summ = sweep_stats.summaries(recs, order)
  assert list(summ) == ["net", "mlp"]
  assert list(summ["net"]["methods"]) == ["kaiming", "good", "bad"]
  assert summ["net"]["points"] == ["Acc@50", "Acc@100", "Acc@200", "end"]
  assert summ["mlp"]["points"] == ["Acc@50", "Acc@100", "Acc@200", "Acc_1", "Acc_2", "end"]
  k = summ["net"]["methods"]["kaiming"]
  assert k["near_chance"] == 1 and k["Acc@100"]["median"] == pytest.approx(0.70)
  assert summ["net"]["methods"]["bad"]["near_chance"] == 3
  assert summ["net"]["methods"]["good"]["seeds"] == [0, 1, 2, 5]

  cells = {
    (c["model"], c["method"], c["point"]): c["verdict"] for c in sweep_stats.significant_cells(summ)
  }
  assert (
    cells[("net", "good", "Acc@50")] == "better" and cells[("net", "good", "Acc@200")] == "better"
  )
  assert cells[("net", "bad", "Acc@100")] == "worse" and cells[("net", "bad", "Acc@200")] == "worse"
  assert ("net", "good", "Acc@100") not in cells  # Kaiming's near-chance seed widens its std
  assert cells[("mlp", "slow", "Acc_1")] == "worse" and ("mlp", "slow", "end") not in cells
  assert ("mlp", "slow", "Acc_2") not in cells  # equal, std 0: no difference

  signs = sweep_stats.sign_tests(recs, order)
  g = signs["net"]["methods"]["good"]
  assert (g["Acc@100"]["wins"], g["Acc@100"]["losses"], g["Acc@100"]["p"]) == (2, 1, 1.0)
  assert (g["end"]["wins"], g["end"]["losses"], g["end"]["ties"]) == (2, 0, 1)  # seed 5 unpaired
  assert g["end"]["p"] == 0.5
  assert signs["mlp"]["methods"]["slow"]["Acc_2"]["ties"] == 3

  md = sweep_stats.markdown(recs, order, "synthetic")
  assert "| net | bad | Acc@100 |" in md and "**worse** |" in md and "**better** |" in md
  assert "| good | 4 | 40.0 ± 0.0 (40.0) |" in md
  assert "| kaiming | 3 |" in md and "1 of 3 |" in md
  assert "| good | 3–0, p 0.25 |" in md and "2–0 (1 tied), p 0.5 |" in md
  table = sweep_stats.significance_table(recs, order)  # the docs' block: the significant cells
  assert "| net | bad | Acc@100 |" in table and "| net | good | Acc@50 |" in table
  assert "| net | good | Acc@100 |" not in table and "| mlp | slow | Acc_1 |" in table
