"""GradCosine tracked during training (`train.gc_every`): logged at step 0, every N steps and
at the last step; equal to `nio_jax.measure` on the params of those steps; compiled once per
run (batch-norm models included); kept across a resume; off (and free) by default; bad
values are named. Tiny models, CPU, well under a minute."""

import jax
import jax.monitoring
import pytest

import nio_jax
from nio_jax import experiment, files, reports, train
from nio_jax.errors import ConfigError
from nio_jax.experiment_config import apply_override, base_config, validate_config
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.train.metrics import gc_records, read_metrics
from tests.test_train import make_setup, tiny_config

_COMPILES: list = []


def _count_compiles(name, *_, **__):
  if name == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(name)


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _fmnist_or_skip():
  try:
    from nio_jax import data

    data.load_fashion_mnist("test")
  except (FileNotFoundError, OSError) as e:  # pragma: no cover - dataset not installed
    pytest.skip(f"Fashion-MNIST not available: {e}")


def _mini_config(gc_every):
  c = base_config()
  c.name = "gc_every"
  c.model.name = "mlp"
  c.model.kwargs.hidden = (16, 16)
  c.data.batch_size = 32
  c.data.train_subset = 256  # 8 steps per epoch
  c.data.test_subset = 100
  c.init.method = "kaiming"
  c.init.measure_batches = 2
  c.max_steps = 5  # ends inside the first epoch: step 5 is the last step
  c.train.num_epochs = 1
  c.train.schedule = "constant"
  c.train.lr = 0.05
  c.train.log_every = 2
  c.train.checkpoint_every_steps = 1
  c.train.max_to_keep = 10
  c.train.progress = False
  c.train.plots = False
  c.train.gc_every = gc_every
  validate_config(c)
  return c


def test_gc_every_logs_and_equals_measure_on_the_checkpoints(tmp_path):
  pytest.importorskip("matplotlib")
  _fmnist_or_skip()
  cfg = _mini_config(2)
  wd = tmp_path / "run"
  rec = experiment.train_run(cfg, wd)
  assert rec["status"] == "finished" and rec["step"] == 5
  logged = gc_records(read_metrics(wd / "metrics.jsonl"))
  assert list(logged) == [0, 2, 4, 5]  # step 0, every 2 steps, the last step
  assert set(rec["gc_steps"]) == {"0", "2", "4", "5"}
  assert rec["gc_seconds"] > 0 and all(m["seconds"] > 0 for m in logged.values())
  assert files.read_json(wd / files.RUN_RECORD)["gc_steps"] == rec["gc_steps"]
  # Step 0 is the initialised model: the GC report's "after" (same batches, same setting).
  assert rec["gc_steps"]["0"]["gc"] == rec["after"]["gc"]

  # Each value is nio_jax.measure on that step's checkpointed params, with the GC report's
  # batches and settings (as `nio-jax measure --checkpoint STEP` computes it).
  run = experiment.build(cfg)
  batches = list(experiment.init_batches(run, 2, stream=2))
  final = files.load_variables(wd / "final_params.msgpack", run.variables)
  for step in (0, 2, 4, 5):
    v = files.load_checkpoint_variables(wd / "checkpoints", str(step), run.variables)
    loss_fn, params = experiment.init_loss_fn(run, v)
    m = nio_jax.measure(loss_fn, params, batches, num_batches=2, num_chunks=4, overlap=0.2)
    assert logged[step]["gc"] == pytest.approx(m["gc"], rel=1e-6, abs=1e-7)
    assert logged[step]["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-6)
  m = experiment.measure_params(run, *experiment.init_loss_fn(run, final))
  assert logged[5]["gc"] == pytest.approx(m["gc"], rel=1e-6, abs=1e-7)

  # The report: a line in report.md and the GC / gradient-norm panels.
  text, plots = reports.report([wd], wd)
  assert "GradCosine during training" in text and "at step 5" in text
  assert (wd / "report_training.png").stat().st_size > 1000

  # Another seed of the same model: the measurement is compiled already (one compile per
  # model, not per step or run).
  cfg1 = _mini_config(2)
  cfg1.seed = 1
  _COMPILES.clear()
  rec1 = experiment.train_run(cfg1, tmp_path / "seed1")
  assert set(rec1["gc_steps"]) == {"0", "2", "4", "5"}
  assert len(_COMPILES) == 0, f"{len(_COMPILES)} XLA compilations for the second seed"

  # gc_every=0 (the default): no record, no time, no gc_fn built.
  assert base_config().train.gc_every == 0
  cfg0 = _mini_config(0)
  calls = []
  orig = experiment.gc_tracker
  experiment.gc_tracker = lambda *a, **k: calls.append(a) or orig(*a, **k)
  try:
    rec0 = experiment.train_run(cfg0, tmp_path / "off")
  finally:
    experiment.gc_tracker = orig
  assert not calls and rec0["gc_steps"] == {} and rec0["gc_seconds"] == 0.0
  assert not gc_records(read_metrics(tmp_path / "off" / "metrics.jsonl"))
  assert "GradCosine during training" not in reports.report([tmp_path / "off"], tmp_path)[0]


@pytest.fixture(scope="module")
def bn_setup():
  """TinyCNN with batch norm, its config and one `default_gc_fn` for the module's tests (its
  measurement, and the train step, compile once)."""
  model, variables, loader, test = make_setup(bn=True)
  cfg = tiny_config(num_epochs=1, gc_every=2, checkpoint_every_steps=2, max_to_keep=10)
  gc_fn = train.default_gc_fn(model, variables, loader, cfg)
  return model, variables, loader, test, cfg, gc_fn


def test_batch_norm_uses_batch_statistics_and_compiles_once(tmp_path, bn_setup):
  """For a BN model the running statistics do not enter: a step's value equals a
  measurement with that checkpoint's own `batch_stats`; later calls compile nothing."""
  model, variables, loader, test, cfg, inner = bn_setup
  per_call = []

  def gc_fn(v):
    n = len(_COMPILES)
    out = inner(v)
    per_call.append(len(_COMPILES) - n)
    return out

  res = train.train(model, variables, loader, test, cfg, tmp_path, gc_fn=gc_fn)
  assert list(res.gc_steps) == [0, 2, 4, 6] and res.gc_seconds > 0  # 6 steps per epoch
  assert per_call[1:] == [0, 0, 0], per_call
  v = files.load_checkpoint_variables(tmp_path / "checkpoints", "4", variables)
  moved = jax.tree.leaves(v["batch_stats"])[0] - jax.tree.leaves(variables["batch_stats"])[0]
  assert float(abs(moved).max()) > 0  # the running statistics did change
  # closes over step 4's batch_stats
  loss_fn = linen_loss_fn(model, batch_stats=v["batch_stats"], apply_kwargs={"train": True})
  m = nio_jax.measure(loss_fn, v["params"], list(loader.batches(5, stream=2)), num_batches=5)
  assert res.gc_steps[4]["gc"] == pytest.approx(m["gc"], rel=1e-5, abs=1e-6)
  assert res.gc_steps[4]["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-5)


def test_resume_keeps_the_series_without_repeats(tmp_path, bn_setup):
  model, variables, loader, test, cfg, gc_fn = bn_setup
  kw = {"gc_fn": gc_fn}
  full = train.train(model, variables, loader, test, cfg, tmp_path / "full", **kw)
  part = train.train(model, variables, loader, test, cfg, tmp_path / "cut", stop_after_step=3, **kw)
  assert list(part.gc_steps) == [0, 2, 3]  # the call's last step is measured too
  res = train.train(model, variables, loader, test, cfg, tmp_path / "cut", **kw)
  assert list(full.gc_steps) == [0, 2, 4, 6] and list(res.gc_steps) == [0, 2, 3, 4, 6]
  steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if r["type"] == "gc"]
  assert steps == [0, 2, 3, 4, 6]
  for s in (0, 2, 4, 6):
    assert res.gc_steps[s]["gc"] == pytest.approx(full.gc_steps[s]["gc"], rel=1e-6)
  assert res.train_seconds > 0 and res.gc_seconds > 0


@pytest.mark.parametrize("value", ["-1", "2.5", "'2'", "True", "None"])
def test_bad_gc_every_is_named(value):
  cfg = base_config()
  with pytest.raises(ConfigError, match="train.gc_every"):
    apply_override(cfg, "train.gc_every", eval(value))  # noqa: S307 - literals only
    validate_config(cfg)


def test_gc_every_needs_measure_batches_and_the_trainer_checks_too():
  cfg = base_config()
  cfg.train.gc_every = 10
  cfg.init.measure_batches = 0
  with pytest.raises(ConfigError, match="init.measure_batches"):
    validate_config(cfg)
  t = train.default_config()
  t.gc_every = -3
  with pytest.raises(ValueError, match="gc_every"):
    train.validate_train_config(t)
  with pytest.raises(TypeError, match="gc_every"):
    t.gc_every = 1.5  # ConfigDict's type check, or validate's
    train.validate_train_config(t)
