"""`nio-jax compare`: several methods on one config through the one experiment runner, with
one picture, a table and a sentence; shared compilation; resumable; bad input."""

import json
import pathlib

import pytest

from nio_jax import cli, experiment, reports
from nio_jax.errors import ConfigError
from nio_jax.experiment_config import load_config
from nio_jax.train.steps import STEPS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fmnist_compare.py")

TINY = [
  "model.name=mlp",
  "model.kwargs={'hidden': (32,)}",
  "data.pad_to_32=False",
  "data.train_subset=256",
  "data.test_subset=256",
  "data.batch_size=64",
  "data.prefetch=0",
  "init.batch_size=32",
  "init.measure_batches=1",
  "max_steps=4",
  "eval.steps=(2, 4)",
  "eval.subset=128",
  "train.eval_batch_size=128",
  "train.log_every=2",
  "compare.overrides.nio=('init.config.num_steps=3',)",
]


def _need_fmnist():
  from nio_jax.data import find_fashion_mnist_dir

  try:
    find_fashion_mnist_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _argv(workdir, *extra):
  sets = [f"--set={s}" for s in TINY]
  return ["compare", "--config", CONFIG, "--workdir", str(workdir), "--no-progress", *sets, *extra]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  _need_fmnist()
  w = tmp_path_factory.mktemp("compare")
  n_steps = len(STEPS)
  rc = cli.main(_argv(w, "--methods", "kaiming,nio"))
  return w, rc, len(STEPS) - n_steps


def test_compare_runs_each_method_and_draws_one_picture(compared):
  w, rc, _ = compared
  assert rc == 0
  out = json.loads((w / "compare.json").read_text())
  assert out["methods"] == ["kaiming", "nio"] and out["reused"] == []
  assert (w / "compare.png").stat().st_size > 1000
  md = (w / "compare.md").read_text()
  assert "| Kaiming |" in md and "| NIO |" in md and "compare.png" in md
  assert "acc@2 (%)" in md and "acc@4 (%)" in md and "Test accuracy after 2 steps" in md
  for m, steps in (("kaiming", 0), ("nio", 3)):
    rec = json.loads((w / m / "run_record.json").read_text())
    assert rec["method"] == m and rec["status"] == "finished"
    assert rec["step"] == 4 and set(rec["acc_steps"]) == {"2", "4"}
    assert (rec["search_steps"] or 0) == steps
  k = json.loads((w / "kaiming" / "run_record.json").read_text())
  n = json.loads((w / "nio" / "run_record.json").read_text())
  # Same seed: the same initial params and the same GC batches, so the same "before".
  assert k["before"]["gc"] == n["before"]["gc"] and k["before"]["loss"] == n["before"]["loss"]
  assert k["after"] == k["before"] and n["after"]["gc"] != n["before"]["gc"]


def test_compare_shares_the_compiled_training_step(compared):
  _, _, new_steps = compared
  assert new_steps <= 1  # both methods trained with one cached (jitted) training step


def test_compare_reads_finished_runs_back(compared, capsys):
  w, _, _ = compared
  before = (w / "nio" / "run_record.json").read_text()
  assert cli.main(_argv(w, "--methods", "kaiming,nio")) == 0
  out = json.loads((w / "compare.json").read_text())
  assert out["reused"] == ["kaiming", "nio"]
  assert (w / "nio" / "run_record.json").read_text() == before
  assert "read back, not repeated" in capsys.readouterr().out


@pytest.mark.parametrize(
  "methods, match",
  [("kaiming,bogus", "unknown initialisation method 'bogus'"), ("nio,nio", "listed twice")],
)
def test_compare_bad_methods(tmp_path, capsys, methods, match):
  assert cli.main(_argv(tmp_path, "--methods", methods)) == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "kaiming").exists()  # checked before any run starts


def test_method_overrides_apply_to_their_method_only():
  cfg, _ = load_config(CONFIG)
  nio = experiment.method_run_config(cfg, "nio")
  grad = experiment.method_run_config(cfg, "gradinit")
  kai = experiment.method_run_config(cfg, "kaiming")
  assert nio.init.method == "nio" and nio.init.config.num_steps > 0
  assert grad.init.recipe == "vgg19" and "num_steps" not in kai.init.config
  assert kai.init.recipe is None and nio.name == "fmnist_compare_nio"
  assert cfg.init.method == "kaiming"  # the base config is not changed
  cfg.compare.overrides.nio = ("init.config.no_such_key=1",)
  with pytest.raises(ConfigError, match="no_such_key"):
    experiment.method_run_config(cfg, "nio")


def _rec(accs, before=None, after=None, steps=0):
  return {
    "acc_steps": {str(s): a for s, a in accs.items()},
    "before": before,
    "after": after,
    "search_steps": steps,
    "search_seconds": 1.5 if steps else 0.0,
  }


def test_compare_table_and_sentence_read_the_numbers():
  g = lambda gc, gn: {"gc": gc, "grad_norm": gn}  # noqa: E731
  out = {
    "methods": ["kaiming", "nio"],
    "records": {
      "kaiming": _rec({25: 0.30, 50: 0.50, 75: 0.70}, g(0.1, 1.0), g(0.1, 1.0)),
      "nio": _rec({25: 0.60, 50: 0.65, 75: 0.69}, g(0.1, 1.0), g(0.4, 2.0), steps=50),
    },
  }
  table = reports.compare_table(out)
  assert "| NIO | 50 | 1.5 | 0.100 → 0.400 | 1.000 → 2.000 | 60.0 | 65.0 | 69.0 |" in table
  s = reports.compare_sentence(out)
  assert "after 25 steps Kaiming 30.0 %, NIO 60.0 % (NIO leads)" in s
  assert "after 75 steps Kaiming 70.0 %, NIO 69.0 % (Kaiming leads)" in s
  assert "NIO is ahead of Kaiming at 2 of 3 evaluations." in s
