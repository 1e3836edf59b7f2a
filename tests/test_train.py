"""Tests of nio_jax.train: schedules, optimizer groups, the trainer (metrics, plots,
checkpoints), bit-for-bit resume, non-finite stop, training from given variables. Tiny
models, CPU, < ~1 min."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nio_jax import data, files, train
from nio_jax.train import optim
from nio_jax.train.steps import STEPS


# ----------------------------------------------------------------------------- fixtures
class TinyCNN(nn.Module):
  """conv(8) -> [BN] -> relu -> dense(10) on flattened features."""

  bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=2)(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def synthetic(n=192, hw=12, seed=0):
  """Learnable fake data: class k has a bright bar at row k."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  imgs = rng.integers(0, 80, (n, hw, hw, 1), dtype=np.uint8)
  for i, k in enumerate(labels):
    imgs[i, k + 1, 2:-2, 0] = 255
  return data.ArrayDataset(imgs, labels, 10, (0.2,), (0.3,), "synthetic", "train")


def tiny_config(**kw):
  cfg = train.default_config()
  cfg.num_epochs = 2
  cfg.batch_size = 32
  cfg.lr = 0.05
  cfg.log_every = 2
  cfg.eval_batch_size = 50
  cfg.progress = False
  cfg.plots = False
  cfg.update(kw)
  return cfg


_INIT_CACHE = {}


def make_setup(bn=True, augment=False, n=192):
  ds = synthetic(n)
  tf = data.Transform(
    ds.mean, ds.std, crop_padding=1 if augment else 0, flip=augment, cutout=4 if augment else 0
  )
  loader = data.Loader(ds, 32, seed=0, transform=tf)
  model = TinyCNN(bn=bn)
  if bn not in _INIT_CACHE:
    _INIT_CACHE[bn] = numpy_init(model, (1, 12, 12, 1))
  return model, _INIT_CACHE[bn], loader, synthetic(100, seed=1)


def numpy_init(model, input_shape, seed=0):
  """He-normal kernels, zero biases, unit BN scale/var, filled in numpy from the shapes of
  ``model.init`` (compiling flax's initialisers costs seconds of CPU; eval_shape does not)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(path[-1].key)
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), s.shape), s.dtype)
    return jnp.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- schedules
def test_lr_scaling_and_cosine_per_iteration():
  cfg = train.default_config()
  cfg.batch_size = 256
  assert train.peak_lr(cfg) == pytest.approx(0.2)
  cfg.num_epochs = 4
  s = train.make_schedule(cfg, steps_per_epoch=10)
  t = np.arange(41)
  np.testing.assert_allclose([s(i) for i in t], 0.1 * (1 + np.cos(np.pi * t / 40)), atol=1e-6)
  assert train.total_epochs(cfg) == 4


def test_step_schedule_and_warmup():
  cfg = train.default_config()
  cfg.update(num_epochs=10, schedule="step", step_epochs=(5, 8), step_decay=0.1)
  s = train.make_schedule(cfg, 4)
  assert [round(float(s(i)), 6) for i in (0, 19, 20, 31, 32, 39)] == [
    0.1,
    0.1,
    0.01,
    0.01,
    0.001,
    0.001,
  ]
  cfg.update(schedule="cosine", warmup_epochs=1.0)
  s = train.make_schedule(cfg, 4)
  np.testing.assert_allclose([s(i) for i in range(4)], [0.025, 0.05, 0.075, 0.1], atol=1e-7)
  assert float(s(4)) == pytest.approx(0.1) and float(s(40)) == pytest.approx(0.0, abs=1e-7)


def test_plus_one_epoch_baselines():
  spe = 5
  cfg = train.default_config()
  cfg.update(num_epochs=3)
  plain = train.make_schedule(cfg, spe)
  cfg.baseline = "extra_epoch_constant"
  assert train.total_epochs(cfg) == 4
  const = train.make_schedule(cfg, spe)
  np.testing.assert_allclose([const(i) for i in range(spe)], [0.1] * spe)
  np.testing.assert_allclose(
    [const(spe + i) for i in range(16)], [plain(i) for i in range(16)], atol=1e-7
  )
  cfg.baseline = "extra_epoch_warmup"
  warm = train.make_schedule(cfg, spe)
  np.testing.assert_allclose(
    [warm(i) for i in range(spe)], [0.1 * (i + 1) / spe for i in range(spe)], atol=1e-7
  )
  np.testing.assert_allclose(
    [warm(spe + i) for i in range(16)], [plain(i) for i in range(16)], atol=1e-7
  )
  cfg.baseline = "bogus"
  with pytest.raises(ValueError):
    train.make_schedule(cfg, spe)


# ----------------------------------------------------------------------------- optimizer
def test_param_groups_by_path():
  params = {
    "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
    "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
    "block": {"bn1": {"scale": jnp.ones(2)}, "scale": jnp.ones(1), "bias1": jnp.ones(1)},
    "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
  }
  mask = train.decay_mask(params)
  assert mask["Conv_0"]["kernel"] and mask["Conv_0"]["bias"] and mask["Dense_0"]["kernel"]
  assert not mask["BatchNorm_0"]["scale"] and not mask["block"]["bn1"]["scale"]
  assert train.has_norm_layers(params)
  labels = train.param_labels(params, slow_biases=True)
  assert labels["Conv_0"] == {"kernel": "default", "bias": "slow"}
  assert labels["block"]["scale"] == "slow" and labels["block"]["bias1"] == "slow"
  assert set(jax.tree.leaves(train.param_labels(params, slow_biases=False))) == {"default"}


def test_optimizer_weight_decay_slow_lr_and_clipping():
  params = {
    "Conv_0": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
    "LayerNorm_0": {"scale": jnp.full((2,), 2.0)},
  }
  cfg = train.default_config()
  cfg.update(num_epochs=1, lr=1.0, schedule="constant", weight_decay=0.5)
  tx, _ = train.make_optimizer(cfg, params, 10, no_norm=False)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  assert float(upd["Conv_0"]["kernel"][0, 0]) == pytest.approx(-1.0)  # -lr * wd * w
  assert float(upd["Conv_0"]["bias"][0]) == pytest.approx(-1.0)
  assert float(upd["LayerNorm_0"]["scale"][0]) == 0.0  # no decay on norm layers
  # no-norm recipe: biases at lr/10, clip at global norm 1
  cfg.weight_decay = 0.0
  tx, _ = train.make_optimizer(cfg, params, 10, no_norm=True)
  ones = jax.tree.map(jnp.ones_like, params)  # global norm sqrt(8) -> clipped to 1
  upd, _ = tx.update(ones, tx.init(params), params)
  g = 1 / np.sqrt(8)
  assert float(upd["Conv_0"]["kernel"][0, 0]) == pytest.approx(-g, rel=1e-5)
  assert float(upd["Conv_0"]["bias"][0]) == pytest.approx(-0.1 * g, rel=1e-5)


def test_resolve_no_norm_recipe():
  cfg = train.default_config()
  m, v, _, _ = make_setup(bn=True)
  assert not optim.resolve_no_norm(cfg, v)
  m, v, _, _ = make_setup(bn=False)
  assert optim.resolve_no_norm(cfg, v) and optim.resolve_grad_clip(cfg, True) == 1.0
  cfg.no_norm_recipe = False
  assert not optim.resolve_no_norm(cfg, v)


# ----------------------------------------------------------------------------- trainer
def test_two_epoch_training_writes_metrics_checkpoints_plot(tmp_path):
  model, variables, loader, test_set = make_setup(bn=False)
  cfg = tiny_config(plots=True, progress=True)
  res = train.train(model, variables, loader, test_set, cfg, tmp_path)
  recs = train.read_metrics(tmp_path / "metrics.jsonl")
  tr = [r for r in recs if r["type"] == "train"]
  ev = [r for r in recs if r["type"] == "eval"]
  assert recs[0]["type"] == "config" and recs[0]["no_norm_recipe"] is True
  assert len(tr) == 6 and len(ev) == 2
  assert tr[-1]["loss"] < tr[0]["loss"] and ev[1]["train_loss"] < ev[0]["train_loss"]
  assert all(r["images_per_sec"] > 0 for r in tr)
  assert res.acc_1 == ev[0]["test_acc"] and res.acc_best == max(r["test_acc"] for r in ev)
  assert res.finished and res.step == 12 and res.epochs_completed == 2
  assert (tmp_path / "curves.png").stat().st_size > 1000
  assert files.checkpoint_steps(tmp_path / "checkpoints") == [0, 6, 12]
  ck = train.Checkpointer(tmp_path / "checkpoints", 3)
  state, meta = ck.restore(None, _target(res, cfg))
  ck.close()
  assert meta["loader"] == {"epoch": 2, "step": 0} and meta["acc_1"] == res.acc_1
  assert_trees_equal(state["params"], res.variables["params"])
  # calling again on a finished workdir is a no-op resume
  res2 = train.train(model, variables, loader, test_set, cfg, tmp_path)
  assert res2.step == 12 and res2.acc_best == res.acc_best


def _target(res, cfg):
  tx, _ = train.make_optimizer(cfg, res.variables["params"], 6, no_norm=True)
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": res.variables["params"],
    "opt_state": tx.init(res.variables["params"]),
    "rng": jax.random.key_data(jax.random.key(0)),
    "bad_step": jnp.zeros((), jnp.int32),
  }


def test_resume_is_bit_for_bit(tmp_path):
  """2 epochs straight == stop (pre-emption) + new process-like call resuming, both at the
  epoch boundary (step 6) and mid-epoch (step 8, loader resumes at epoch 1, step 2)."""
  model, variables, loader, test_set = make_setup(bn=True, augment=True)
  cfg = tiny_config()
  straight = train.train(model, variables, loader, test_set, cfg, tmp_path / "straight")
  ev_s = [r for r in train.read_metrics(tmp_path / "straight/metrics.jsonl") if r["type"] == "eval"]
  for stop in (6, 8):
    wd = tmp_path / f"resumed{stop}"
    part = train.train(model, variables, loader, test_set, cfg, wd, stop_after_step=stop)
    assert not part.finished and part.step == stop
    # "kill": nothing survives in memory; a new call restores from the checkpoint
    if stop == 8:  # as in a fresh process, recompile the step functions too
      STEPS.clear()
    log_before = (wd / "metrics.jsonl").read_text()
    resumed = train.train(model, variables, loader, test_set, cfg, wd)
    assert resumed.finished and resumed.step == straight.step
    # It resumed from the checkpoint of step `stop`, and the log continues: the lines written
    # before the stop are kept verbatim (a restart from scratch would rewrite them).
    log_after = (wd / "metrics.jsonl").read_text()
    assert log_after.startswith(log_before)
    recs = train.read_metrics(wd / "metrics.jsonl")
    assert [r["step"] for r in recs if r["type"] == "resume"] == [stop]
    assert [r["type"] for r in recs].count("config") == 1
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == straight.step
    assert_trees_equal(resumed.variables, straight.variables)
    assert resumed.acc_best == straight.acc_best and resumed.acc_1 == straight.acc_1
    ev_r = [r for r in train.read_metrics(wd / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["test_acc"] for r in ev_s] == [r["test_acc"] for r in ev_r]
    assert [r["train_loss"] for r in ev_s] == pytest.approx([r["train_loss"] for r in ev_r])


class NaNAfter:
  """Wraps a loader; batch ``step`` of ``epoch`` gets NaN images."""

  def __init__(self, loader, epoch, step):
    self.loader, self.at = loader, (epoch, step)
    self.steps_per_epoch, self.batch_size = loader.steps_per_epoch, loader.batch_size

  def batches(self, num, stream=1):
    return self.loader.batches(num, stream)

  def epoch(self, epoch, start_step=0, stream=0):
    for k, b in enumerate(self.loader.epoch(epoch, start_step, stream)):
      if (epoch, start_step + k) == self.at:
        b = {**b, "image": np.full_like(b["image"], np.nan)}
      yield b


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  model, variables, loader, test_set = make_setup(bn=False)
  cfg = tiny_config(num_epochs=3, log_every=4, max_to_keep=2)
  with pytest.raises(train.NonFiniteLossError) as err:
    train.train(model, variables, NaNAfter(loader, 1, 3), test_set, cfg, tmp_path)
  assert err.value.step == 6 + 3 and err.value.epoch == 1 and err.value.last_checkpoint == 6
  ck = train.Checkpointer(tmp_path / "checkpoints", 2)
  assert ck.latest_step() == 6
  tx, _ = train.make_optimizer(cfg, variables["params"], 6, no_norm=True)
  target = {
    "step": jnp.zeros((), jnp.int32),
    "params": variables["params"],
    "opt_state": tx.init(variables["params"]),
    "rng": jax.random.key_data(jax.random.key(0)),
    "bad_step": jnp.zeros((), jnp.int32),
  }
  state, meta = ck.restore(None, target)
  ck.close()
  assert int(state["step"]) == 6 and int(state["bad_step"]) == -1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  recs = train.read_metrics(tmp_path / "metrics.jsonl")
  assert recs[-1]["type"] == "nonfinite" and recs[-1]["step"] == 9


def test_checkpoint_atomicity_and_retention(tmp_path):
  with pytest.raises(ValueError):
    train.Checkpointer(tmp_path / "x", max_to_keep=1)
  with pytest.raises(ValueError, match="max_to_keep"):
    train.validate_train_config(tiny_config(max_to_keep=1))
  d = tmp_path / "ck"
  ck = train.Checkpointer(d, 2)
  for s in (1, 2, 3):
    ck.save(s, {"a": jnp.full(3, float(s))}, {"s": s})
  ck.close()
  assert sorted(os.listdir(d)) == ["2", "3"]  # max_to_keep
  # a write killed half-way leaves only an unfinalised temporary directory
  (d / "4.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  (d / "4.orbax-checkpoint-tmp-1234" / "state" / "partial").write_text("x")
  ck = train.Checkpointer(d, 2)
  assert ck.latest_step() == 3
  state, meta = ck.restore(None, {"a": jnp.zeros(3)})
  assert meta == {"s": 3} and float(state["a"][0]) == 3.0
  ck.save(5, {"a": jnp.zeros(3)}, {"s": 5})
  ck.close()
  assert sorted(os.listdir(d)) == ["3", "5"]  # temporary directory cleaned up


def test_trains_the_given_variables_with_mixed_precision(tmp_path):
  """The trainer starts from the variables it is given (initialised by the caller):
  checkpoint 0 holds them; mixed precision keeps float32 params; a resume trains on from the
  checkpoint, whatever variables it is handed."""
  model, variables, loader, test_set = make_setup(bn=True)
  initialised = {**variables, "params": jax.tree.map(lambda x: 0.5 * x, variables["params"])}
  cfg = tiny_config(num_epochs=1, mixed_precision=True)
  res = train.train(model, initialised, loader, test_set, cfg, tmp_path)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(res.variables))
  assert res.acc_1 is not None and np.isfinite(res.acc_1)
  assert not (tmp_path / "init_history.json").exists()  # initialising is the caller's step
  ck = train.Checkpointer(tmp_path / "checkpoints", 3)
  tx, _ = train.make_optimizer(cfg, variables["params"], 6, no_norm=False)
  target = {
    "step": jnp.zeros((), jnp.int32),
    "params": variables["params"],
    "opt_state": tx.init(variables["params"]),
    "batch_stats": variables["batch_stats"],
    "rng": jax.random.key_data(jax.random.key(0)),
    "bad_step": jnp.zeros((), jnp.int32),
  }
  state0, _ = ck.restore(0, target)
  ck.close()
  assert_trees_equal(state0["params"], initialised["params"])
  again = train.train(model, variables, loader, test_set, cfg, tmp_path)  # finished: resumes
  assert_trees_equal(again.variables, res.variables)


def test_train_state_round_trips_through_a_checkpoint_dict():
  model, variables, _, _ = make_setup(bn=True)
  tx, _ = train.make_optimizer(tiny_config(), variables["params"], 6, no_norm=False)
  state = train.TrainState.create(variables, tx, 3)
  d = state.as_dict()
  assert set(d) == {"step", "params", "opt_state", "rng", "bad_step", "batch_stats"}
  assert int(d["bad_step"]) == -1 and int(d["step"]) == 0
  assert_trees_equal(train.TrainState.from_dict(d), state)
  assert_trees_equal(state.variables(), variables)
  plain = train.TrainState.create({"params": variables["params"]}, tx, 3)
  assert "batch_stats" not in plain.as_dict() and plain.batch_stats is None


def test_eval_at_steps_and_time_split(tmp_path):
  """`eval_at` evaluates after the given steps on its own test data (the accuracy equals an
  evaluation of the params checkpointed at that step), a stop inside an epoch can be
  evaluated too, and the wall time is split into training and evaluation."""
  model, variables, loader, test = make_setup(bn=False)
  cfg = tiny_config(num_epochs=1)
  sub = test.subset(40)
  res = train.train(
    model, variables, loader, test, cfg, tmp_path, stop_after_step=5, eval_at={2: sub, 5: test}
  )
  assert sorted(res.step_evals) == [2, 5] and res.step == 5 and not res.finished
  # The step-5 accuracy is that of the returned params on the whole test set.
  logits = model.apply(
    res.variables,
    (test.images.astype(np.float32) / 255.0 - np.float32(0.2)) / np.float32(0.3),
    train=False,
  )
  acc = float(np.mean(np.argmax(np.asarray(logits), -1) == test.labels))
  assert res.step_evals[5] == pytest.approx(acc)
  assert res.train_seconds > 0 and res.eval_seconds > 0
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs if r["type"] == "step_eval"] == [2, 5]
  with pytest.raises(ValueError, match="eval_at"):
    train.train(model, variables, loader, test, cfg, tmp_path / "b", eval_at={0: test})
  with pytest.raises(ValueError, match="resume_step"):  # "latest", None or a step
    train.train(model, variables, loader, test, cfg, tmp_path / "c", resume_step="first")
