"""The training loop: the compiled SGD step over epochs, evaluations, JSON-lines metrics,
plots, and Orbax checkpoints with bit-for-bit resume.

Usage:

    from nio_jax import data, train
    loader, test_set = data.make_loaders("cifar10", batch_size=128, seed=0)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    cfg = train.default_config(); cfg.num_epochs = 200
    train.validate_train_config(cfg)
    result = train.train(model, variables, loader, test_set, cfg, "runs/resnet110")
    print(result.acc_1, result.acc_best)

The trainer trains the variables it is given: initialising them (a search, a method) is
the caller's step, before it (`nio_jax.experiment.train_run`). Calling `train` again with
the same `workdir` resumes from the latest checkpoint (the model, loader and config must be
the same); a caller that has already decided whether the run resumes (the experiment driver,
which skips the search on resume) passes that decision as `resume_step`. The steps
themselves are `nio_jax.train.steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import checks
from nio_jax.errors import NonFiniteError
from nio_jax.files import to_jsonable
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.train.checkpoint import Checkpointer
from nio_jax.train.eval_data import EvalData, as_eval_data
from nio_jax.train.metrics import MetricsLog, gc_fn_of, plot_curves
from nio_jax.train.optim import resolve_grad_clip, resolve_no_norm
from nio_jax.train.progress import Progress, TrainResult
from nio_jax.train.steps import Steps, TrainState, build_steps
from nio_jax.train.train_config import total_epochs

PyTree = Any


class NonFiniteLossError(NonFiniteError):
  """Training stopped because the loss became NaN/inf.

  A `nio_jax.errors.NonFiniteError` (one `except NonFiniteError` catches both search and
  training faults).

  Attributes:
    step: 0-based global iteration whose loss was first non-finite.
    epoch: its 0-based epoch.
    last_checkpoint: the step of the last good checkpoint (intact in `workdir`); also
      available as `last_good`.
  """

  def __init__(self, step: int, epoch: int, last_checkpoint: int | None):
    super().__init__(
      f"non-finite loss at step {step} (epoch {epoch}); training stopped. The last good "
      f"checkpoint is step {last_checkpoint}; resume from it with a lower learning rate, "
      "gradient clipping or another initialisation.",
      step=step,
      last_good=last_checkpoint,
    )
    self.epoch, self.last_checkpoint = epoch, last_checkpoint

  def __reduce__(self):
    return type(self), (self.step, self.epoch, self.last_checkpoint)


class TrainingPreempted(SystemExit):
  """SIGTERM (how preemptible machines stop a job) arrived during `train`: the step reached
  was checkpointed, and calling `train` again with the same `workdir` resumes from it and
  ends equal to an uninterrupted run.

  A `SystemExit` with code 143 (128 + SIGTERM): uncaught, the process exits as a terminated
  job would, after the checkpoint; `except Exception` in user code does not swallow it.

  Attributes:
    step: the global step checkpointed.
  """

  def __init__(self, step: int):
    super().__init__(128 + signal.SIGTERM)
    self.step = step

  def __str__(self) -> str:
    return (
      f"SIGTERM: training stopped at step {self.step}, checkpointed; run the same command "
      "(train with the same workdir) to resume."
    )


class _Preemption:
  """Whether SIGTERM asked the run to stop, agreed by every process.

  One process: a Python SIGTERM handler (installed for the `train` call, main thread only,
  the previous handler restored after) sets a flag that the loop reads after each step.
  Several processes (`jax.distributed`): JAX's own preemption notifier takes SIGTERM, and
  `multihost_utils.reached_preemption_sync_point(step)` makes every process stop at the same
  step (the checkpoint is collective).
  """

  def __init__(self):
    self.flag = threading.Event()
    self.multi = jax.process_count() > 1

  @contextlib.contextmanager
  def installed(self):
    if self.multi or threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)

  def requested(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:  # no preemption manager (JAX without the distributed client)
        return False
    return self.flag.is_set()


class _NullLog:
  """The metrics log of a process other than 0 in a multi-process run: writes nothing (the
  primary process writes the one log), reads the primary's file."""

  def __init__(self, path: pathlib.Path):
    self.path = path

  def reset(self) -> None:
    pass

  def truncate_after(self, step: int) -> None:
    pass

  def write(self, record: dict) -> None:
    pass

  def read(self) -> list[dict]:
    return MetricsLog(self.path).read()


def train(
  model,
  variables: PyTree,
  train_loader,
  test_data,
  config,
  workdir,
  *,
  stop_after_step: int | None = None,
  eval_at: dict | None = None,
  mesh=None,
  gc_fn: Callable | None = None,
  resume_step: int | None | str = "latest",
) -> TrainResult:
  """Trains a linen classifier with the recipe in `config`; resumes if `workdir` has a
  checkpoint (or as `resume_step` says).

  Args:
    model: a `flax.linen.Module` returning logits; called as
      `model.apply(variables, images, train=True/False)` (keyword: `config.train_kwarg`),
      with `mutable=["batch_stats"]` in training when `variables` has `batch_stats`.
      `rngs={"dropout": ...}` is passed in training.
    variables: the initial `{"params": ..., ["batch_stats": ...]}`, already initialised
      (e.g. by a search); checkpoint 0 holds them. Ignored when resuming, except for their
      structure.
    train_loader: a `nio_jax.data.Loader` (needs `steps_per_epoch`, `batch_size`,
      `epoch(epoch, start_step)`).
    test_data: a Loader, an in-memory source with `mean` / `std`
      (`nio_jax.data.ArrayDataset`), or `{"image": float32, "label": int}` arrays.
    config: `nio_jax.train.default_config()` (an `ml_collections.ConfigDict`), validated
      (`nio_jax.train.validate_train_config`; an experiment config's `train` group is
      validated when the config is loaded).
    workdir: output directory: `metrics.jsonl`, `checkpoints/`, `curves.png`.
    stop_after_step: checkpoint and return once this global step is reached (simulates a
      pre-emption, or ends a run inside an epoch; a later call resumes).
    eval_at: optional `{step: test_data}`: after global step `step`, evaluate on that
      test data (same kinds as `test_data`; e.g. a fixed subset at early steps). The
      accuracies are in `TrainResult.step_evals` and `metrics.jsonl` (type `step_eval`);
      their wall time counts as evaluation, not training.
    mesh: optional `jax.sharding.Mesh` with a `data` axis (`nio_jax.distributed.make_mesh`):
      data-parallel training. Each batch is sharded over the `data` axis, params /
      optimizer state / batch statistics are replicated and `jit` (GSPMD) inserts the
      gradient all-reduce; batch-norm statistics are computed over the global batch, so the
      result equals single-device training to float tolerance. The loader's batch size and
      `eval_batch_size` must be multiples of the number of devices. Checkpoints are the same
      as without a mesh. Multi-process (after `nio_jax.distributed.initialize_multihost`,
      `mesh` over every process's devices, the default when `mesh` is None): every process
      runs `train` with the same arguments and loader (each feeds the global batch; its own rows go to its devices),
      checkpoints are written together (Orbax), and only process 0 writes `metrics.jsonl`
      and `curves.png`.
    gc_fn: for `config.gc_every = N > 0`: `gc_fn(variables) -> dict` with at least `gc`
      and `grad_norm` (e.g. `nio_jax.measure` on fixed batches), called at step 0 (the
      initial variables), every `N` steps and at the last step. The results are in
      `TrainResult.gc_steps` and `metrics.jsonl` (type `gc`, with `seconds`); their wall
      time is `TrainResult.gc_seconds`, not training. Without one, `default_gc_fn`
      (`nio_jax.measure` with its defaults on 5 batches of loader stream 2). Unused when
      `gc_every` is 0.
    resume_step: where the run starts, decided by the caller: a checkpoint step of
      `workdir/checkpoints` (resume from it), or None (a fresh start from `variables`:
      the log restarts and checkpoint 0 is written). The default, "latest", decides here:
      the latest checkpoint (`Checkpointer.latest_step`) if there is one, else a fresh
      start. `nio_jax.experiment.train_run` decides once (no search on resume) and passes
      its decision. In a multi-process run every process passes the same value.

  Returns:
    The `TrainResult` of the run (over every call for the accuracies, of this call for the
    wall times).

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays intact.
    TrainingPreempted: SIGTERM arrived; the step reached was checkpointed first (a
      `SystemExit`, code 143).
  """
  if mesh is None and jax.process_count() > 1:  # several processes train one model together
    from nio_jax import distributed  # noqa: PLC0415

    mesh = distributed.make_mesh()
  _check_inputs(model, variables, train_loader, test_data, stop_after_step, eval_at, mesh, gc_fn)
  _check_resume_step(resume_step)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(workdir / "checkpoints", int(config.max_to_keep))
  if isinstance(resume_step, str):  # "latest": called on its own, the trainer decides
    resume_step = ckpt.latest_step()
  job = _Job(
    model=model,
    variables=dict(variables),
    train_loader=train_loader,
    test_data=test_data,
    config=config,
    workdir=workdir,
    stop_after_step=stop_after_step,
    eval_at=dict(eval_at or {}),
    mesh=mesh,
    gc_fn=gc_fn,
    resume_step=None if resume_step is None else int(resume_step),
  )
  primary = jax.process_index() == 0
  log = (MetricsLog if primary else _NullLog)(workdir / "metrics.jsonl")
  try:
    return _fit(job, log, ckpt)
  finally:
    ckpt.close()


def _check_inputs(model, variables, train_loader, test_data, stop_after_step, eval_at, mesh, gc_fn):
  """Clear errors for bad arguments of `train` (before any compile or file write)."""
  if not hasattr(model, "apply"):
    raise TypeError(f"model must be a flax.linen.Module (with .apply), got {type(model).__name__}.")
  if not isinstance(variables, dict) or "params" not in variables:
    raise TypeError(
      "variables must be a dict {'params': ..., ['batch_stats': ...]} as "
      "returned by model.init(...); got "
      f"{type(variables).__name__}"
      f"{' with keys ' + str(sorted(variables)) if isinstance(variables, dict) else ''}."
    )
  checks.check_params(variables["params"], "variables['params']")
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and not bool(
      np.all(np.isfinite(np.asarray(leaf)))
    ):
      raise ValueError(
        f"variables leaf {jax.tree_util.keystr(path)} contains NaN or inf; "
        "start from finite parameters (e.g. a search's last_good result)."
      )
  for attr in ("steps_per_epoch", "batch_size", "epoch"):
    if not hasattr(train_loader, attr):
      raise TypeError(
        f"train_loader must be a nio_jax.data.Loader (needs .{attr}); got "
        f"{type(train_loader).__name__}."
      )
  if int(train_loader.steps_per_epoch) < 1:
    raise ValueError("train_loader has no full batch per epoch (steps_per_epoch < 1).")
  if isinstance(test_data, dict):
    if not {"image", "label"} <= set(test_data):
      raise ValueError(
        f"test_data as a dict needs 'image' and 'label' arrays; got keys {sorted(test_data)}."
      )
    if len(test_data["image"]) != len(test_data["label"]) or len(test_data["label"]) == 0:
      raise ValueError(
        f"test_data has {len(test_data['image'])} images and "
        f"{len(test_data['label'])} labels; they must match and be > 0."
      )
  elif not (hasattr(test_data, "epoch") or hasattr(test_data, "mean")):
    raise TypeError(
      "test_data must be a Loader, an ArrayDataset (with mean/std) or "
      f"{{'image', 'label'}} arrays; got {type(test_data).__name__}."
    )
  if stop_after_step is not None and (
    isinstance(stop_after_step, bool)
    or not isinstance(stop_after_step, (int, np.integer))
    or stop_after_step < 1
  ):
    raise ValueError(f"stop_after_step={stop_after_step!r} must be None or an int >= 1.")
  for k in eval_at or {}:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"eval_at keys must be global steps >= 1, got {k!r}")
  if gc_fn is not None and not callable(gc_fn):
    raise TypeError(f"gc_fn must be callable (variables) -> dict; got {type(gc_fn).__name__}.")
  if mesh is not None:
    if "data" not in getattr(mesh, "axis_names", ()):
      raise ValueError("mesh needs a 'data' axis (nio_jax.distributed.make_mesh()).")
    n = mesh.devices.size
    if int(train_loader.batch_size) % n:
      raise ValueError(
        f"train batch size {train_loader.batch_size} is not divisible by "
        f"the {n} devices of the mesh; use a multiple of {n}."
      )


def _check_resume_step(resume_step) -> None:
  """`resume_step` is "latest", None or a step >= 0."""
  if resume_step is None or (isinstance(resume_step, str) and resume_step == "latest"):
    return
  if (
    isinstance(resume_step, bool)
    or not isinstance(resume_step, (int, np.integer))
    or resume_step < 0
  ):
    raise ValueError(
      f"resume_step={resume_step!r} must be 'latest', None (a fresh start) or a checkpoint "
      "step >= 0."
    )


@dataclasses.dataclass(frozen=True)
class _Job:
  """The arguments of one `train` call, as the loop reads them."""

  model: Any
  variables: dict
  train_loader: Any
  test_data: Any
  config: Any
  workdir: pathlib.Path
  stop_after_step: int | None
  eval_at: dict
  mesh: Any
  gc_fn: Callable | None = None
  resume_step: int | None = None  # the checkpoint to restore, None: a fresh start


@dataclasses.dataclass
class _Clock:
  """Wall seconds of this call spent outside the training steps."""

  eval_seconds: float = 0.0
  gc_seconds: float = 0.0


def _fit(job: _Job, log: MetricsLog, ckpt: Checkpointer) -> TrainResult:
  """The loop of `train`: restore or start, then epochs of steps, evaluations, checkpoints."""
  loop = _Loop(job, log, ckpt)
  with loop.preemption.installed():
    return loop.run()


class _Loop:
  """One `train` call, in the order it runs: `start` (restore or start, step 0's GC
  measurement and checkpoint), then for each epoch `step`s with `after_step` (logging,
  `eval_at`, `gc_every`, mid-epoch checkpoints) and `end_epoch` (evaluation and checkpoint),
  then `result`.

  Attributes (the mutable ones):
    state: the `TrainState` the compiled steps carry.
    record: the `Progress` so far (restored from the checkpoint on resume).
    sums: the steps' accumulators (`_new_sums`).
    clock: the wall seconds outside the training steps.
    g: the global step reached.
  """

  def __init__(self, job: _Job, log: MetricsLog, ckpt: Checkpointer):
    config = job.config
    self.job, self.log, self.ckpt, self.config = job, log, ckpt, config
    self.spe = int(job.train_loader.steps_per_epoch)
    self.epochs = total_epochs(config)
    self.total_steps = self.epochs * self.spe
    stop = job.stop_after_step
    self.last_step = self.total_steps if stop is None else min(self.total_steps, stop)
    self.log_every = max(1, int(config.log_every))
    self.ckpt_every = int(config.checkpoint_every_steps or 0)
    has_bs = bool(jax.tree_util.tree_leaves(job.variables.get("batch_stats", {})))
    self.no_norm = resolve_no_norm(config, job.variables)
    self.steps = build_steps(job.model, config, self.spe, has_bs, self.no_norm)
    self.state = TrainState.create(job.variables, self.steps.tx, int(config.seed))
    self.record = Progress()
    self.clock = _Clock()
    # GradCosine tracking (`gc_every`): at step 0, every `gc_every` steps and at the last step.
    self.gc_every = int(config.get("gc_every") or 0)
    self.gc_fn = None
    if self.gc_every:
      self.gc_fn = job.gc_fn or default_gc_fn(job.model, job.variables, job.train_loader, config)
    self.put = jax.device_put
    self.g = 0
    self.sums = None
    self.t_window, self.g_window = 0.0, 0
    self.pbar = None
    self.preemption = _Preemption()
    self.preempted = False

  # ---- start: restore or start, step 0

  def start(self) -> None:
    """Restores checkpoint `resume_step` (and continues its log), or starts the log and saves
    checkpoint 0; measures GC at step 0; replicates the state over the mesh."""
    config, log, ckpt, spe = self.config, self.log, self.ckpt, self.spe
    if self.job.mesh is not None:
      # Replicated first: restore and checkpoint 0 then see the state's real (global)
      # shardings, which Orbax needs to write and read one checkpoint from every process.
      from nio_jax import distributed  # noqa: PLC0415

      self.state = distributed.replicate(self.state, self.job.mesh)
      self.put = functools.partial(distributed.shard_batch, mesh=self.job.mesh)
    latest = self.job.resume_step
    if latest is not None:
      saved, meta = ckpt.restore(latest, self.state.as_dict())
      self.state, self.record = TrainState.from_dict(saved), Progress.from_meta(meta)
      log.truncate_after(int(latest))
      # The log continues (records up to the checkpoint are kept) and says where it resumed.
      log.write({"type": "resume", "step": int(latest)})
    else:
      log.reset()
      log.write(
        {
          "type": "config",
          "step": 0,
          "no_norm_recipe": self.no_norm,
          "grad_clip_norm": resolve_grad_clip(config, self.no_norm),
          "steps_per_epoch": spe,
          "total_epochs": self.epochs,
          "config": config.to_dict(),
        }
      )
    if self.gc_fn is not None and int(self.state.step) == 0 and 0 not in self.record.gc_steps:
      self.measure_gc(0)
    if latest is None:
      ckpt.save(0, self.state.as_dict(), self.record.meta(0, spe))
    self.g = int(self.state.step)
    self.sums = _new_sums(self.record.epoch_sums, self.job.mesh)

  # ---- helpers of the steps

  def check(self) -> None:
    """`NonFiniteLossError` when a step so far had a non-finite loss."""
    _check_finite(
      self.state,
      ckpt=self.ckpt,
      log=self.log,
      spe=self.spe,
      config=self.config,
      workdir=self.job.workdir,
    )

  def measure_gc(self, step: int) -> float:
    """`gc_fn` on the current variables, recorded at `step`; returns its wall seconds."""
    return _measure_gc(self.gc_fn, self.state, step, self.record, self.clock, self.log)

  def evaluate(self, data: EvalData) -> tuple[float, float]:
    """`(mean test loss, test accuracy)` of the current state on `data`."""
    return _evaluate(self.steps, self.state, data, self.put, self.clock)

  def save(self, g: int) -> None:
    self.ckpt.save(g, self.state.as_dict(), self.record.meta(g, self.spe))

  # ---- after each step

  def log_window(self, g: int) -> None:
    """The `train` line of the metrics log (and the progress bar) for the last window."""
    now = time.perf_counter()
    ips = (g - self.g_window) * self.job.train_loader.batch_size / max(now - self.t_window, 1e-9)
    rec = _train_record(self.sums, g, self.spe, float(self.steps.schedule(g - 1)), ips)
    self.log.write(rec)
    self.pbar.set_postfix(
      loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", ips=f"{ips:.0f}", lr=f"{rec['lr']:.3g}"
    )
    self.sums = self.sums.at[0].set(0.0)
    self.t_window, self.g_window = now, g

  def after_step(self, g: int, step_eval_data: dict) -> bool:
    """Logging, the `eval_at` evaluation, the `gc_every` measurement and a mid-epoch
    checkpoint after global step `g`; True when the call stops here, inside an epoch."""
    record, stop_after = self.record, self.job.stop_after_step
    if g % self.log_every == 0:
      self.check()
      self.log_window(g)
    if g in step_eval_data and g not in record.step_evals:
      self.check()
      _, record.step_evals[g] = self.evaluate(step_eval_data[g])
      self.log.write({"type": "step_eval", "step": g, "test_acc": record.step_evals[g]})
    if (
      self.gc_fn is not None
      and g not in record.gc_steps
      and (g % self.gc_every == 0 or g >= self.last_step)
    ):
      self.check()
      self.t_window += self.measure_gc(g)  # not in images/s
    end_of_epoch = g % self.spe == 0
    stop = stop_after is not None and g >= stop_after
    if self.preemption.requested(g):
      self.preempted = stop = True
      self.log.write({"type": "preempted", "step": g})
    if not end_of_epoch and (stop or (self.ckpt_every and g % self.ckpt_every == 0)):
      self.check()
      record.epoch_sums = np.asarray(self.sums[1]).tolist()
      self.save(g)
    return stop and not end_of_epoch

  # ---- after each epoch

  def end_epoch(self, epoch: int, eval_data: EvalData, t_epoch: float) -> None:
    """The epoch's evaluation and `eval` line, its accuracies in the record, and the
    checkpoint at its last step."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    self.check()
    g, config = self.g, self.config
    e = np.asarray(self.sums[1], np.float64)
    test_loss, test_acc = self.evaluate(eval_data)
    rec = {
      "type": "eval",
      "step": g,
      "epoch": epoch + 1,
      "train_loss": e[0] / e[2],
      "train_acc": e[1] / e[2],
      "test_loss": test_loss,
      "test_acc": test_acc,
      "lr": float(self.steps.schedule(g - 1)),
      "epoch_time": time.perf_counter() - t_epoch,
    }
    self.log.write(rec)
    self.record.add_epoch_eval(rec, epoch, config.baseline)
    if config.progress:
      tqdm.write(
        f"{_process_tag()}epoch {epoch + 1}/{self.epochs}: train loss {rec['train_loss']:.4f} "
        f"acc {rec['train_acc']:.4f} | test loss {test_loss:.4f} "
        f"acc {test_acc:.4f}"
      )
    self.record.epoch_sums = [0.0, 0.0, 0.0]
    self.sums = _new_sums(self.record.epoch_sums, self.job.mesh)
    self.save(g)

  # ---- the loop

  def run(self) -> TrainResult:
    from tqdm.auto import tqdm  # noqa: PLC0415

    job, config, spe = self.job, self.config, self.spe
    self.start()
    eval_bs = int(config.eval_batch_size)
    eval_data = as_eval_data(job.test_data, eval_bs)
    step_eval_data = {int(k): as_eval_data(v, eval_bs) for k, v in job.eval_at.items()}
    epoch, s0 = divmod(self.g, spe)
    self.pbar = tqdm(
      total=self.total_steps,
      initial=self.g,
      disable=not config.progress,
      unit="step",
      dynamic_ncols=True,
      desc=_process_tag() + job.workdir.name,
    )
    self.t_window, self.g_window = time.perf_counter(), self.g
    t_loop, gc_before_loop = self.t_window, self.clock.gc_seconds
    finished = True
    try:
      while epoch < self.epochs:
        t_epoch = time.perf_counter()
        it = job.train_loader.epoch(epoch, s0)
        try:
          for batch in _device_prefetch(it, 2, self.put):
            self.state, self.sums = self.steps.train_step(self.state, self.sums, batch)
            self.g += 1
            self.pbar.update(1)
            if self.after_step(self.g, step_eval_data):
              finished = False
              break
        finally:
          close = getattr(it, "close", None)
          if close is not None:
            close()
        if not finished:
          break
        self.end_epoch(epoch, eval_data, t_epoch)
        epoch, s0 = epoch + 1, 0
        if self.preempted or (job.stop_after_step is not None and self.g >= job.stop_after_step):
          finished = epoch >= self.epochs
          break
    finally:
      self.pbar.close()
    loop_seconds = time.perf_counter() - t_loop
    self.ckpt.wait()
    if self.preempted and not (finished and self.g >= self.total_steps):
      err = TrainingPreempted(self.g)
      print(f"{_process_tag()}{err}", file=sys.stderr, flush=True)
      raise err
    train_seconds = loop_seconds - self.clock.eval_seconds
    result = self.result(finished, train_seconds - (self.clock.gc_seconds - gc_before_loop))
    _finish_plots(config, self.log, job.workdir)
    return result

  def result(self, finished: bool, train_seconds: float) -> TrainResult:
    record, g = self.record, self.g
    return TrainResult(
      variables=self.state.variables(),
      acc_1=record.acc_1,
      acc_1_main=record.acc_1_main,
      acc_best=record.acc_best,
      final_test_acc=record.evals[-1]["test_acc"] if record.evals else None,
      epochs_completed=g // self.spe,
      step=g,
      evals=list(record.evals),
      finished=finished and g >= self.total_steps,
      step_evals=dict(sorted(record.step_evals.items())),
      train_seconds=train_seconds,
      eval_seconds=self.clock.eval_seconds,
      gc_steps=dict(sorted(record.gc_steps.items())),
      gc_seconds=self.clock.gc_seconds,
    )


def _process_tag() -> str:
  """`"[process i/N] "` in a multi-process run, else `""` (prefix of log lines)."""
  from nio_jax import distributed  # noqa: PLC0415

  return distributed.process_tag()


def _new_sums(epoch_sums, mesh):
  """The step's accumulators `[loss * n, correct, n]`: row 0 the log window (zeros), row 1
  the epoch (`epoch_sums`); replicated over `mesh` when there is one."""
  sums = jnp.asarray([[0.0, 0.0, 0.0], epoch_sums], jnp.float32)
  if mesh is None:
    return sums
  from nio_jax import distributed  # noqa: PLC0415

  return distributed.replicate(sums, mesh)


def _train_record(sums, g: int, spe: int, lr: float, images_per_sec: float) -> dict:
  """The `train` line of the metrics log at step `g`: the log window's mean loss and
  accuracy (row 0 of `sums`), the learning rate and the throughput."""
  w = np.asarray(sums[0], np.float64)
  return {
    "type": "train",
    "step": g,
    "epoch": g / spe,
    "loss": w[0] / w[2],
    "acc": w[1] / w[2],
    "lr": lr,
    "images_per_sec": images_per_sec,
  }


def _evaluate(steps: Steps, state: TrainState, data: EvalData, put, clock: _Clock):
  """`(mean test loss, test accuracy)` of `state` on `data`; adds the wall time to `clock`."""
  t = time.perf_counter()
  tot = jnp.zeros(2, jnp.float32)
  for b in data.batches():
    tot = tot + steps.eval_step(state, put(b))
  loss_sum, correct = np.asarray(tot, np.float64)
  clock.eval_seconds += time.perf_counter() - t
  return loss_sum / data.num_examples, correct / data.num_examples


def _measure_gc(gc_fn, state: TrainState, step: int, record: Progress, clock: _Clock, log) -> float:
  """Calls `gc_fn` on the variables of `state`, records and logs the result; returns its
  wall seconds (also added to `clock`)."""
  t = time.perf_counter()
  out = to_jsonable(dict(gc_fn(state.variables())))
  dt = time.perf_counter() - t
  clock.gc_seconds += dt
  record.gc_steps[step] = out
  log.write({"type": "gc", "step": step, **out, "seconds": dt})
  return dt


def _check_finite(state: TrainState, *, ckpt, log, spe: int, config, workdir) -> None:
  """Raises `NonFiniteLossError` (after logging it and drawing the curves) when a step of
  `state` had a non-finite loss."""
  bad = int(state.bad_step)
  if bad >= 0:
    last = ckpt.latest_step()
    log.write({"type": "nonfinite", "step": bad, "epoch": bad // spe, "last_checkpoint": last})
    _finish_plots(config, log, workdir)
    raise NonFiniteLossError(bad, bad // spe, last)


def default_gc_fn(model, variables: PyTree, train_loader, config, num_batches: int = 5):
  """The `gc_fn` of `train` when `config.gc_every` is set and none is given.

  `nio_jax.measure` (its default sub-batch setting D=4, r=0.2, and its default leaves,
  those of the searches) on `num_batches` fixed batches of loader stream 2. The loss applies
  the model in training mode: for batch-norm models each batch is normalised by its own
  statistics, so the running statistics do not enter and one compiled step serves the
  whole run. A failed measurement (e.g. a zero gradient) is returned as `{"error": ...}`.
  """
  kw = {config.train_kwarg: True} if config.train_kwarg else {}
  bs = variables.get("batch_stats") or None
  loss_fn = linen_loss_fn(model, batch_stats=bs, apply_kwargs=kw)
  return gc_fn_of(loss_fn, train_loader.batches(num_batches, stream=2))


def _device_prefetch(
  it: Iterable[dict], size: int = 2, put: Callable = jax.device_put
) -> Iterator[dict]:
  """Starts the (asynchronous) host-to-device copy of the next `size - 1` batches while
  the current step runs (`put`: `jax.device_put`, or sharding over a mesh)."""
  buf: list = []
  for b in it:
    buf.append(put(b))
    if len(buf) >= size:
      yield buf.pop(0)
  while buf:
    yield buf.pop(0)


def _finish_plots(config, log: MetricsLog, workdir: pathlib.Path) -> None:
  """Draws `curves.png` from the metrics log (when `config.plots`); a failure is logged."""
  if not config.plots or jax.process_index() != 0:  # process 0 draws the one picture
    return
  try:
    plot_curves(log.read(), workdir / "curves.png", title=workdir.name)
  except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
    log.write({"type": "warning", "step": -1, "message": f"plot failed: {e!r}"})
