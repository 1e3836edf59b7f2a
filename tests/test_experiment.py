"""The experiment decides a run, the trainer trains: `experiment.train_run` initialises once
(its batches drawn once, at `init.batch_size`), hands the initialised variables to the
trainer (checkpoint 0 holds them), and a resumed run does not search again; the one run
record carries the accuracies. Tiny MLP on a Fashion-MNIST subset, CPU."""

import jax
import numpy as np
import pytest

from nio_jax import experiment, files, methods
from nio_jax.data.loader import Loader
from nio_jax.experiment_config import base_config, validate_config


def _fmnist_or_skip():
  from nio_jax.data import find_fashion_mnist_dir

  try:
    find_fashion_mnist_dir()
  except FileNotFoundError as e:  # pragma: no cover - dataset not installed
    pytest.skip(str(e))


def _config(max_steps):
  c = base_config()
  c.name = "experiment_order"
  c.model.name = "mlp"
  c.model.kwargs.hidden = (16,)
  c.data.batch_size = 32
  c.data.train_subset = 256  # 8 steps per epoch
  c.data.test_subset = 64
  c.data.prefetch = 0
  c.init.method = "nio"
  c.init.config.num_steps = 2
  c.init.batch_size = 16  # not the training batch: the experiment draws its own
  c.init.measure_batches = 1
  c.max_steps = max_steps
  c.train.num_epochs = 1
  c.train.log_every = 2
  c.train.checkpoint_every_steps = 1
  c.train.max_to_keep = 10
  c.train.progress = False
  c.train.plots = False
  validate_config(c)
  return c


def test_train_run_initialises_once_and_a_resume_does_not_search(tmp_path, monkeypatch):
  _fmnist_or_skip()
  searches, draws = [], []
  initialize, batches = methods.initialize, Loader.batches

  def counting_initialize(method, loss_fn, params, data, *a, **k):
    searches.append([b["image"].shape[0] for b in data])
    return initialize(method, loss_fn, params, data, *a, **k)

  def counting_batches(self, num, stream=1):
    draws.append((self.batch_size, num, stream))
    return batches(self, num, stream)

  resumes, train = [], experiment.trainmod.train

  def recording_train(*a, **k):  # the driver decides the resume and passes it down
    resumes.append(k["resume_step"])
    return train(*a, **k)

  monkeypatch.setattr(methods, "initialize", counting_initialize)
  monkeypatch.setattr(Loader, "batches", counting_batches)
  monkeypatch.setattr(experiment.trainmod, "train", recording_train)
  wd = tmp_path / "run"
  rec = experiment.train_run(_config(3), wd)
  assert rec["status"] == "finished" and rec["step"] == 3 and not rec["resumed"]
  assert resumes == [None]  # a fresh start
  assert searches == [[16, 16]]  # one search, on 2 batches of init.batch_size
  assert [d for d in draws if d[2] == 1] == [(16, 2, 1)]  # the method's batches, drawn once
  assert rec["search_steps"] == 2 and rec["search_seconds"] > 0
  assert rec["after"]["gc"] != rec["before"]["gc"]
  # One record: the accuracies the report reads are in it (no other summary file).
  assert rec["final_test_acc"] == rec["acc_steps"]["3"] and not (wd / "summary.json").exists()
  first = files.read_json(wd / files.RUN_RECORD)
  assert first["final_test_acc"] == rec["final_test_acc"] and first["scales"]

  # Checkpoint 0 holds the initialised params, as saved in init_params.msgpack.
  run = experiment.build(_config(3))
  init = files.load_variables(wd / "init_params.msgpack", run.variables)
  step0 = files.load_checkpoint_variables(wd / "checkpoints", "0", run.variables)
  for a, b in zip(jax.tree.leaves(init["params"]), jax.tree.leaves(step0["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(init["params"]), jax.tree.leaves(run.variables["params"])):
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the search changed them

  # Resume to a later step: no search, no new init files; the record keeps the search's.
  history = (wd / "init_history.json").read_text()
  rec2 = experiment.train_run(_config(5), wd)
  assert searches == [[16, 16]] and rec2["resumed"] and rec2["step"] == 5
  assert resumes == [None, 3]  # from the driver's one look at the checkpoints
  assert (wd / "init_history.json").read_text() == history
  for k in ("before", "after", "search_steps", "search_seconds", "scales"):
    assert rec2[k] == first[k], k
  assert set(rec2["acc_steps"]) == {"3", "5"}


def test_workdir_config_comparison_is_on_the_resolved_config(tmp_path):
  """`check_workdir` compares resolved configs: a method key set to its default is the same
  config, a result-neutral key (RESULT_NEUTRAL_KEYS) does not count, anything else refuses;
  without a run's results in the workdir nothing is refused."""
  from nio_jax.errors import ConfigError

  a, b = _config(3), _config(3)
  b.init.config.gamma = float(methods.get_method("nio").config_cls().gamma)  # = the default
  b.max_steps, b.data.prefetch, b.train.progress = 9, 3, True  # result-neutral
  assert (
    experiment.config_changes(experiment.resolved_config(a), experiment.resolved_config(b)) == []
  )
  b.train.base_lr = 0.05
  assert experiment.config_changes(
    experiment.resolved_config(a), experiment.resolved_config(b)
  ) == ["train.base_lr: 0.1 -> 0.05"]
  wd = tmp_path / "w"
  assert experiment.check_workdir(a, wd) is None and (wd / "config.json").is_file()
  assert experiment.check_workdir(b, wd) is None  # no results yet: the config is replaced
  files.write_json(wd / files.RUN_RECORD, {"finished": True})
  with pytest.raises(ConfigError, match="train.base_lr: 0.05 -> 0.1.*--overwrite"):
    experiment.check_workdir(a, wd)
  assert experiment.check_workdir(b, wd) == "same config, no checkpoint yet: the search runs again"
  assert "deleted" in experiment.check_workdir(a, wd, overwrite=True)
  assert not (wd / files.RUN_RECORD).exists()
  (wd / "init_params.msgpack").write_bytes(b"")
  (wd / "config.json").unlink()
  with pytest.raises(ConfigError, match="no config.json to compare with"):
    experiment.check_workdir(a, wd)


def test_a_new_method_flows_through_with_its_facts_only(tmp_path):
  """A method registered here, with its facts (`Method`: label, data kinds, batches per step,
  seeding, recipes, searches), is configured, run, recorded and reported with no edit
  outside `nio_jax/methods/`: the layers above read the facts, never a method's name."""
  import dataclasses

  import nio_jax
  from nio_jax import experiment_config, reports
  from nio_jax.errors import ConfigError

  _fmnist_or_skip()

  @dataclasses.dataclass(frozen=True)
  class ToyConfig:
    num_steps: int = 1
    scale: float = 1.0
    seed: int = 0

    @classmethod
    def create(cls, config=None, **overrides):
      values = {**dict(config or {}), **overrides}
      unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
      return cls(**values)

    def to_dict(self):
      return dataclasses.asdict(self)

  seen = []

  def toy(loss_fn, params, data, config=None, *, progress=False, mesh=None):
    seen.append(data if isinstance(data, dict) else len(list(data)))
    params = jax.tree.map(lambda p: p * config.scale, params)
    history = {"loss": np.zeros(config.num_steps)}
    return nio_jax.InitResult(params, None, history, "_test_toy", config.to_dict())

  methods.register(
    "_test_toy",
    config_cls=ToyConfig,
    label="Toy method",
    data=("real", "random"),
    batches_per_step=3,
    seeded=("random",),
    recipes={"big": {"scale": 2.0}},
    searches=True,
  )(toy)
  try:
    c = _config(2)
    c.name = "toy"
    c.init.method = "_test_toy"
    c.init.config = {"num_steps": 2}
    c.init.recipe = "big"
    validate_config(c)
    mcfg = experiment_config.build_method_config(c)
    assert (mcfg.scale, mcfg.seed) == (2.0, 0)  # the recipe; no seed for real data
    assert experiment_config.search_batches(c, mcfg) == 6  # 2 steps x 3 batches per step
    c.init.recipe = "tiny"
    with pytest.raises(ConfigError, match="unknown Toy method recipe 'tiny'; known: big"):
      validate_config(c)
    c.init.recipe = "big"

    rec = experiment.train_run(c, tmp_path / "real")
    assert seen == [6] and rec["status"] == "finished"
    assert rec["search_steps"] == 2 and rec["search_rel_step"] > 0  # it searches
    assert "| Toy method | 2 |" in reports.compare_table(
      {"methods": ["_test_toy"], "records": {"_test_toy": rec}}
    )

    r, rm = experiment_config.load_config(
      "nio_jax/configs/fmnist_base.py",
      ["init.method=_test_toy", "init.data=random", "seed=7", "init.config.num_steps=1"],
    )
    assert rm.seed == 7 and experiment_config.build_method_config(r).seed == 7  # seeded (random)
    c.init.data, c.seed = "random", 3
    init = experiment.init_run(c, tmp_path / "random")
    assert seen[-1]["image"] == (16, 28, 28, 1) and init.result.config["seed"] == 3

    nio, _ = experiment_config.load_config(  # switching away drops what nio cannot take
      "nio_jax/configs/fmnist_base.py",
      ["init.method=_test_toy", "init.recipe=big", "init.data=random"],
    )
    nio.init.method = "nio"
    assert experiment_config.switch_method(nio) == ["init.recipe", "init.data"]
  finally:
    methods.unregister("_test_toy")
