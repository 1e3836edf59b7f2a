"""The training loop: one jitted SGD step, per-epoch evaluation, JSON-lines metrics, plots,
Orbax checkpoints with bit-for-bit resume, and an optional initialisation hook.

Usage::

    from nio_jax import data, train
    loader, test_set = data.make_loaders("cifar10", batch_size=128, seed=0)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    cfg = train.default_config(); cfg.num_epochs = 200
    result = train.train(model, variables, loader, test_set, cfg, "runs/resnet110")
    print(result.acc_1, result.acc_best)

Calling :func:`train` again with the same ``workdir`` resumes from the latest checkpoint
(the model, loader and config must be the same).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nio_jax.errors import NonFiniteError
from nio_jax.flax_utils import linen_loss_fn
from nio_jax.per_example import canonical_convs
from nio_jax.train.checkpoint import Checkpointer
from nio_jax.train.config import total_epochs, validate
from nio_jax.train.metrics import MetricsLog, plot_curves, to_jsonable
from nio_jax.train.optim import make_optimizer, resolve_grad_clip, resolve_no_norm

PyTree = Any


class NonFiniteLossError(NonFiniteError, FloatingPointError):
  """Training stopped because the loss became NaN/inf.

  A subclass of :class:`nio_jax.errors.NonFiniteError` (one ``except NonFiniteError``
  catches both search and training faults; still a ``FloatingPointError`` for old callers).

  Attributes:
    step: 0-based global iteration whose loss was first non-finite.
    epoch: its 0-based epoch.
    last_checkpoint: the step of the last good checkpoint (intact in ``workdir``); also
      available as ``last_good``.
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


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns.

  Attributes:
    variables: final ``{"params": ..., "batch_stats": ...}`` (batch_stats only for BN models).
    acc_1: test accuracy after the first epoch that ran (for a "+1 epoch" baseline, that is
      the extra epoch).
    acc_1_main: test accuracy after the first epoch of the main schedule (= ``acc_1`` when
      ``baseline == "none"``; after 2 epochs for the "+1 epoch" baselines).
    acc_best: best test accuracy over the evaluated epochs.
    final_test_acc: test accuracy after the last completed epoch.
    epochs_completed, step: position reached.
    evals: the per-epoch evaluation records.
    finished: False when the run stopped early (``stop_after_step``).
    step_evals: test accuracy at the steps of ``eval_at`` (``{step: acc}``).
    init_seconds: wall time of ``init_fn`` in this call (0 without one, or on resume).
    train_seconds: wall time of the training steps in this call (evaluations excluded).
    eval_seconds: wall time of the evaluations (epoch ends and ``eval_at``) in this call.
    gc_steps: ``{step: gc_fn result}`` of ``config.gc_every`` (empty when off), over the
      whole run (kept across resumes).
    gc_seconds: wall time of the ``gc_fn`` calls in this call (not in ``train_seconds``).
  """

  variables: dict
  acc_1: float | None
  acc_1_main: float | None
  acc_best: float | None
  final_test_acc: float | None
  epochs_completed: int
  step: int
  evals: list[dict]
  finished: bool
  step_evals: dict = dataclasses.field(default_factory=dict)
  init_seconds: float = 0.0
  train_seconds: float = 0.0
  eval_seconds: float = 0.0
  gc_steps: dict = dataclasses.field(default_factory=dict)
  gc_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class _EvalData:
  batches: Callable[[], Iterator[dict]]
  num_examples: int


def _as_eval_data(test_data, batch_size: int) -> _EvalData:
  """Loader, source with ``mean``/``std`` (ArrayDataset, TFDSImageSource) or
  ``{"image": float32, "label": int}`` arrays -> fixed-size padded batches with a mask."""
  from nio_jax.data.augment import Transform  # noqa: PLC0415
  from nio_jax.data.loader import Loader  # noqa: PLC0415

  if isinstance(test_data, dict):
    images = np.asarray(test_data["image"], np.float32)
    labels = np.asarray(test_data["label"], np.int32)
    n = len(labels)

    def gen():
      for i in range(0, n, batch_size):
        yield {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
  else:
    if isinstance(test_data, Loader):
      loader = test_data
    else:
      loader = Loader(
        test_data,
        min(batch_size, len(test_data)),
        shuffle=False,
        drop_remainder=False,
        transform=Transform(test_data.mean, test_data.std),
      )
    n, batch_size = loader.num_examples, loader.batch_size

    def gen():
      return loader.epoch(0)

  def padded():
    for b in gen():
      k = len(b["label"])
      mask = np.zeros(batch_size, np.float32)
      mask[:k] = 1.0
      if k < batch_size:
        pad = batch_size - k
        b = {
          "image": np.concatenate(
            [b["image"], np.zeros((pad,) + b["image"].shape[1:], np.float32)]
          ),
          "label": np.concatenate([b["label"], np.zeros(pad, np.int32)]),
        }
      yield {**b, "mask": mask}

  return _EvalData(padded, n)


def _cross_entropy(logits, labels, num_classes, smoothing):
  logits = logits.astype(jnp.float32)
  if smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits, targets)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _cast_floats(tree, dtype):
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def init_loss_fn(
  model, variables: PyTree, train_kwarg: str | None = "train"
) -> tuple[Callable, PyTree]:
  """``(loss_fn, params)`` for an initialisation method.

  ``loss_fn(params, batch) -> per-example losses [B]`` applies the model in training mode;
  for batch-norm models the ``batch_stats`` are closed over, the batch statistics of each
  call are used and the running statistics are discarded (as the released GradInit / NIO
  code does). ``params`` is ``variables["params"]``: put an init method's result back with
  ``{**variables, "params": result.params}``. Uses ``nio_jax.flax_utils.linen_loss_fn``.
  """
  kwargs = {train_kwarg: True} if train_kwarg else {}
  bs = variables.get("batch_stats") or None
  return linen_loss_fn(model, batch_stats=bs, apply_kwargs=kwargs), variables["params"]


def _run_init(init_fn, model, variables, loader, config, workdir: pathlib.Path):
  loss_fn, params = init_loss_fn(model, variables, config.train_kwarg)
  batches = loader.batches(int(config.init_num_batches), stream=1)
  t0 = time.perf_counter()
  result = init_fn(loss_fn, params, batches)
  seconds = time.perf_counter() - t0
  new_params = result.params
  if isinstance(new_params, dict) and "params" in new_params and "params" not in params:
    variables = {**variables, **new_params}  # an init_fn that returned full variables
  else:
    variables = {**variables, "params": new_params}
  history = getattr(result, "history", None)
  record = {
    "seconds": seconds,
    "method": getattr(result, "method", ""),
    "num_batches": len(batches),
    "history": history,
  }
  (workdir / "init_history.json").write_text(json.dumps(to_jsonable(record)))
  if jax.tree.structure(variables["params"]) != jax.tree.structure(params):
    raise ValueError("init_fn returned params with a different tree structure")
  return variables, seconds


def train(
  model,
  variables: PyTree,
  train_loader,
  test_data,
  config,
  workdir,
  *,
  init_fn: Callable | None = None,
  stop_after_step: int | None = None,
  eval_at: dict | None = None,
  mesh=None,
  gc_fn: Callable | None = None,
) -> TrainResult:
  """Train a linen classifier with the recipe in ``config``; resume if ``workdir`` has a
  checkpoint.

  Args:
    model: a ``flax.linen.Module`` returning logits; called as
      ``model.apply(variables, images, train=True/False)`` (keyword: ``config.train_kwarg``),
      with ``mutable=["batch_stats"]`` in training when ``variables`` has ``batch_stats``.
      ``rngs={"dropout": ...}`` is passed in training.
    variables: initial ``{"params": ..., ["batch_stats": ...]}`` (ignored when resuming).
    train_loader: a :class:`nio_jax.data.Loader` (needs ``steps_per_epoch``,
      ``epoch(epoch, start_step)``, ``batches(num, stream)``).
    test_data: a Loader, an in-memory source with ``mean``/``std``
      (:class:`~nio_jax.data.ArrayDataset`), or ``{"image": float32, "label": int}`` arrays.
    config: :func:`nio_jax.train.default_config` (an ``ml_collections.ConfigDict``).
    workdir: output directory: ``metrics.jsonl``, ``checkpoints/``, ``curves.png``,
      ``summary.json``, ``init_history.json``.
    init_fn: optional ``init_fn(loss_fn, params, batches) -> result`` with
      ``result.params`` (and ``result.history``), run once before training (not on resume);
      ``loss_fn(params, batch) -> [B]`` per-example losses (see :func:`init_loss_fn`),
      ``batches`` a sized iterable of ``config.init_num_batches`` training batches drawn
      from an independent loader stream. E.g.
      ``init_fn=lambda f, p, b: nio_jax.nio(f, p, b, nio_cfg)``.
    stop_after_step: checkpoint and return once this global step is reached (simulates a
      pre-emption, or ends a run inside an epoch; a later call resumes).
    eval_at: optional ``{step: test_data}``: after global step ``step``, evaluate on that
      test data (same kinds as ``test_data``; e.g. a fixed subset at early steps). The
      accuracies are in ``TrainResult.step_evals`` and ``metrics.jsonl`` (type
      ``step_eval``); their wall time counts as evaluation, not training.
    mesh: optional ``jax.sharding.Mesh`` with a ``data`` axis
      (:func:`nio_jax.distributed.make_mesh`): data-parallel training. Each batch is sharded
      over the ``data`` axis, params / optimizer state / batch statistics are replicated and
      ``jit`` (GSPMD) inserts the gradient all-reduce; batch-norm statistics are computed
      over the global batch, so the result equals single-device training to float
      tolerance. The loader's batch size and ``eval_batch_size`` must be multiples of the
      number of devices. Checkpoints are the same as without a mesh.
    gc_fn: for ``config.gc_every = N > 0``: ``gc_fn(variables) -> dict`` with at least
      ``gc`` and ``grad_norm`` (e.g. ``nio_jax.measure`` on fixed batches), called at step
      0 (after ``init_fn``), every ``N`` steps and at the last step. The results are in
      ``TrainResult.gc_steps`` and ``metrics.jsonl`` (type ``gc``, with ``seconds``); their
      wall time is ``TrainResult.gc_seconds``, not training. Without one,
      :func:`default_gc_fn` (``nio_jax.measure`` with its defaults on 5 batches of loader
      stream 2). Unused when ``gc_every`` is 0.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays intact.
  """
  validate(config)
  _check_inputs(model, variables, train_loader, test_data, init_fn, stop_after_step, mesh)
  if gc_fn is not None and not callable(gc_fn):
    raise TypeError(f"gc_fn must be callable (variables) -> dict; got {type(gc_fn).__name__}.")
  for k in eval_at or {}:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"eval_at keys must be global steps >= 1, got {k!r}")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(workdir / "checkpoints", int(config.max_to_keep))
  job = _Job(
    model=model,
    variables=variables,
    train_loader=train_loader,
    test_data=test_data,
    config=config,
    workdir=workdir,
    init_fn=init_fn,
    stop_after_step=stop_after_step,
    eval_at=dict(eval_at or {}),
    mesh=mesh,
    gc_fn=gc_fn,
  )
  try:
    return _train(job, MetricsLog(workdir / "metrics.jsonl"), ckpt)
  finally:
    ckpt.close()


def _check_inputs(model, variables, train_loader, test_data, init_fn, stop_after_step, mesh):
  """Clear errors for bad arguments of :func:`train` (before any compile or file write)."""
  from nio_jax import errors  # noqa: PLC0415

  if not hasattr(model, "apply"):
    raise TypeError(f"model must be a flax.linen.Module (with .apply), got {type(model).__name__}.")
  if not isinstance(variables, dict) or "params" not in variables:
    raise TypeError(
      "variables must be a dict {'params': ..., ['batch_stats': ...]} as "
      "returned by model.init(...); got "
      f"{type(variables).__name__}"
      f"{' with keys ' + str(sorted(variables)) if isinstance(variables, dict) else ''}."
    )
  errors.check_params(variables["params"], "variables['params']")
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
  if init_fn is not None and not callable(init_fn):
    raise TypeError(
      f"init_fn must be callable (loss_fn, params, batches) -> result; got "
      f"{type(init_fn).__name__}."
    )
  if stop_after_step is not None and (
    isinstance(stop_after_step, bool)
    or not isinstance(stop_after_step, (int, np.integer))
    or stop_after_step < 1
  ):
    raise ValueError(f"stop_after_step={stop_after_step!r} must be None or an int >= 1.")
  if mesh is not None:
    if "data" not in getattr(mesh, "axis_names", ()):
      raise ValueError("mesh needs a 'data' axis (nio_jax.distributed.make_mesh()).")
    n = mesh.devices.size
    if int(train_loader.batch_size) % n:
      raise ValueError(
        f"train batch size {train_loader.batch_size} is not divisible by "
        f"the {n} devices of the mesh; use a multiple of {n}."
      )


@dataclasses.dataclass(frozen=True)
class _Job:
  """The arguments of one :func:`train` call, as the loop reads them."""

  model: Any
  variables: PyTree
  train_loader: Any
  test_data: Any
  config: Any
  workdir: pathlib.Path
  init_fn: Callable | None
  stop_after_step: int | None
  eval_at: dict
  mesh: Any
  gc_fn: Callable | None = None


def _train(job: _Job, log: MetricsLog, ckpt: Checkpointer) -> TrainResult:
  model, train_loader, config, workdir = job.model, job.train_loader, job.config, job.workdir
  init_fn, stop_after_step, mesh = job.init_fn, job.stop_after_step, job.mesh
  spe = int(train_loader.steps_per_epoch)
  epochs = total_epochs(config)
  total_steps = epochs * spe
  log_every = max(1, int(config.log_every))
  ckpt_every = int(config.checkpoint_every_steps or 0)
  from tqdm.auto import tqdm  # noqa: PLC0415

  variables = dict(job.variables)
  has_bs = bool(jax.tree_util.tree_leaves(variables.get("batch_stats", {})))
  no_norm = resolve_no_norm(config, variables)
  p_train_step, p_eval_step, tx, schedule = build_steps(model, config, spe, has_bs, no_norm)

  def make_state(v):
    # Fresh copies: the train step donates its state on accelerators, and the caller's
    # arrays must stay valid.
    v = jax.tree.map(lambda x: jnp.array(x, copy=True), v)
    params = v["params"]
    st = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "rng": jax.random.key_data(jax.random.key(int(config.seed))),
      "bad_step": jnp.full((), -1, jnp.int32),
    }
    if has_bs:
      st["batch_stats"] = v["batch_stats"]
    return st

  latest = ckpt.latest_step()
  resumed = latest is not None
  init_seconds = 0.0
  if resumed:
    state, meta = ckpt.restore(latest, make_state(variables))
    log.truncate_after(int(latest))
    # The log continues (records up to the checkpoint are kept) and says where it resumed.
    log.write({"type": "resume", "step": int(latest)})
  else:
    if init_fn is not None:
      variables, init_seconds = _run_init(init_fn, model, variables, train_loader, config, workdir)
    state = make_state(variables)
    meta = {
      "acc_1": None,
      "acc_1_main": None,
      "acc_best": None,
      "evals": [],
      "step_evals": {},
      "gc_steps": {},
      "epoch_sums": [0.0, 0.0, 0.0],
    }
    log.reset()
    log.write(
      {
        "type": "config",
        "step": 0,
        "no_norm_recipe": no_norm,
        "grad_clip_norm": resolve_grad_clip(config, no_norm),
        "steps_per_epoch": spe,
        "total_epochs": epochs,
        "config": config.to_dict(),
      }
    )
  # GradCosine tracking (`gc_every`): at step 0, every `gc_every` steps and at the last step.
  gc_every = int(config.get("gc_every") or 0)
  gc_fn = (job.gc_fn or default_gc_fn(model, variables, train_loader, config)) if gc_every else None
  gc_steps = {int(k): v for k, v in meta.get("gc_steps", {}).items()}
  gc_seconds = [0.0]
  last_step = total_steps if stop_after_step is None else min(total_steps, stop_after_step)

  def measure_gc(st, step) -> float:
    t = time.perf_counter()
    v = {"params": st["params"], **({"batch_stats": st["batch_stats"]} if has_bs else {})}
    out = to_jsonable(dict(gc_fn(v)))
    dt = time.perf_counter() - t
    gc_seconds[0] += dt
    gc_steps[step] = out
    meta["gc_steps"] = {str(k): r for k, r in gc_steps.items()}
    log.write({"type": "gc", "step": step, **out, "seconds": dt})
    return dt

  if gc_fn is not None and int(state["step"]) == 0 and 0 not in gc_steps:
    measure_gc(state, 0)
  if not resumed:
    ckpt.save(0, state, _meta(meta, 0, spe))
  put = jax.device_put
  if mesh is not None:
    from nio_jax import distributed  # noqa: PLC0415

    state = distributed.replicate(state, mesh)
    put = functools.partial(distributed.shard_batch, mesh=mesh)

  eval_bs = int(config.eval_batch_size)
  eval_data = _as_eval_data(job.test_data, eval_bs)
  step_eval_data = {int(k): _as_eval_data(v, eval_bs) for k, v in job.eval_at.items()}
  step_evals = {int(k): v for k, v in meta.get("step_evals", {}).items()}
  eval_seconds = [0.0]

  def evaluate(st, data=eval_data) -> tuple[float, float]:
    t = time.perf_counter()
    tot = jnp.zeros(2, jnp.float32)
    for b in data.batches():
      tot = tot + p_eval_step(st["params"], st.get("batch_stats"), put(b))
    loss_sum, correct = np.asarray(tot, np.float64)
    eval_seconds[0] += time.perf_counter() - t
    return loss_sum / data.num_examples, correct / data.num_examples

  g = int(state["step"])
  epoch, s0 = divmod(g, spe)
  # Accumulators [loss * n, correct, n]: row 0 the log window, row 1 the epoch.
  acc = jnp.asarray([[0.0, 0.0, 0.0], meta.get("epoch_sums", [0.0, 0.0, 0.0])], jnp.float32)
  if mesh is not None:
    acc = distributed.replicate(acc, mesh)
  pbar = tqdm(
    total=total_steps,
    initial=g,
    disable=not config.progress,
    unit="step",
    dynamic_ncols=True,
    desc=workdir.name,
  )
  t_window, g_window = time.perf_counter(), g
  t_loop, gc_before_loop = time.perf_counter(), gc_seconds[0]
  finished = True

  def check_finite(st):
    bad = int(st["bad_step"])
    if bad >= 0:
      last = ckpt.latest_step()
      log.write({"type": "nonfinite", "step": bad, "epoch": bad // spe, "last_checkpoint": last})
      _finish_plots(config, log, workdir)
      raise NonFiniteLossError(bad, bad // spe, last)

  try:
    while epoch < epochs:
      t_epoch = time.perf_counter()
      it = train_loader.epoch(epoch, s0)
      try:
        for batch in _device_prefetch(it, 2, put):
          state, acc = p_train_step(state, acc, batch)
          g += 1
          pbar.update(1)
          if g % log_every == 0:
            w = np.asarray(acc[0], np.float64)
            check_finite(state)
            now = time.perf_counter()
            ips = (g - g_window) * train_loader.batch_size / max(now - t_window, 1e-9)
            rec = {
              "type": "train",
              "step": g,
              "epoch": g / spe,
              "loss": w[0] / w[2],
              "acc": w[1] / w[2],
              "lr": float(schedule(g - 1)),
              "images_per_sec": ips,
            }
            log.write(rec)
            pbar.set_postfix(
              loss=f"{rec['loss']:.3f}",
              acc=f"{rec['acc']:.3f}",
              ips=f"{ips:.0f}",
              lr=f"{rec['lr']:.3g}",
            )
            acc = acc.at[0].set(0.0)
            t_window, g_window = now, g
          if g in step_eval_data and g not in step_evals:
            check_finite(state)
            _, step_evals[g] = evaluate(state, step_eval_data[g])
            meta["step_evals"] = {str(k): v for k, v in step_evals.items()}
            log.write({"type": "step_eval", "step": g, "test_acc": step_evals[g]})
          if gc_fn is not None and g not in gc_steps and (g % gc_every == 0 or g >= last_step):
            check_finite(state)
            t_window += measure_gc(state, g)  # not in images_per_sec
          end_of_epoch = g % spe == 0
          stop = stop_after_step is not None and g >= stop_after_step
          if not end_of_epoch and (stop or (ckpt_every and g % ckpt_every == 0)):
            check_finite(state)
            meta["epoch_sums"] = np.asarray(acc[1]).tolist()
            ckpt.save(g, state, _meta(meta, g, spe))
          if stop and not end_of_epoch:
            finished = False
            break
      finally:
        close = getattr(it, "close", None)
        if close is not None:
          close()
      if not finished:
        break
      # ---- end of epoch: check, evaluate, log, checkpoint
      check_finite(state)
      e = np.asarray(acc[1], np.float64)
      test_loss, test_acc = evaluate(state)
      rec = {
        "type": "eval",
        "step": g,
        "epoch": epoch + 1,
        "train_loss": e[0] / e[2],
        "train_acc": e[1] / e[2],
        "test_loss": test_loss,
        "test_acc": test_acc,
        "lr": float(schedule(g - 1)),
        "epoch_time": time.perf_counter() - t_epoch,
      }
      log.write(rec)
      meta["evals"].append(to_jsonable(rec))
      if meta["acc_1"] is None:
        meta["acc_1"] = test_acc
      main_first = 1 if config.baseline == "none" else 2
      if epoch + 1 == main_first:
        meta["acc_1_main"] = test_acc
      if meta["acc_best"] is None or test_acc > meta["acc_best"]:
        meta["acc_best"] = test_acc
      if config.progress:
        tqdm.write(
          f"epoch {epoch + 1}/{epochs}: train loss {rec['train_loss']:.4f} "
          f"acc {rec['train_acc']:.4f} | test loss {test_loss:.4f} "
          f"acc {test_acc:.4f}"
        )
      acc = jnp.zeros((2, 3), jnp.float32)
      if mesh is not None:
        acc = distributed.replicate(acc, mesh)
      meta["epoch_sums"] = [0.0, 0.0, 0.0]
      epoch, s0 = epoch + 1, 0
      ckpt.save(g, state, _meta(meta, g, spe))
      if stop_after_step is not None and g >= stop_after_step:
        finished = epoch >= epochs
        break
  finally:
    pbar.close()
  loop_seconds = time.perf_counter() - t_loop

  ckpt.wait()
  out_vars = {"params": state["params"]}
  if has_bs:
    out_vars["batch_stats"] = state["batch_stats"]
  evals = list(meta["evals"])
  result = TrainResult(
    variables=out_vars,
    acc_1=meta["acc_1"],
    acc_1_main=meta["acc_1_main"],
    acc_best=meta["acc_best"],
    final_test_acc=evals[-1]["test_acc"] if evals else None,
    epochs_completed=g // spe,
    step=g,
    evals=evals,
    finished=finished and g >= total_steps,
    step_evals=dict(sorted(step_evals.items())),
    init_seconds=init_seconds,
    train_seconds=loop_seconds - eval_seconds[0] - (gc_seconds[0] - gc_before_loop),
    eval_seconds=eval_seconds[0],
    gc_steps=dict(sorted(gc_steps.items())),
    gc_seconds=gc_seconds[0],
  )
  summary = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("variables", "evals")}
  (workdir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=1))
  _finish_plots(config, log, workdir)
  return result


def default_gc_fn(model, variables: PyTree, train_loader, config, num_batches: int = 5):
  """The ``gc_fn`` of :func:`train` when ``config.gc_every`` is set and none is given.

  ``nio_jax.measure`` (its default sub-batch setting D=4, r=0.2, and its default leaves,
  those of the searches) on ``num_batches`` fixed batches of loader stream 2, with the loss
  of :func:`init_loss_fn`: for batch-norm models each batch is normalised by its own
  statistics, so the running statistics do not enter and one compiled step serves the
  whole run. A failed measurement (e.g. a zero gradient) is returned as ``{"error": ...}``.
  """
  from nio_jax.nio_search import measure  # noqa: PLC0415

  loss_fn, _ = init_loss_fn(model, variables, config.train_kwarg)
  batches = list(train_loader.batches(num_batches, stream=2))

  def gc_fn(v):
    try:
      return measure(loss_fn, v["params"], batches, num_batches=len(batches))
    except (ValueError, ArithmeticError) as e:
      return {"error": str(e)}

  return gc_fn


_STEP_CACHE: collections.OrderedDict[Any, tuple] = collections.OrderedDict()

# Training-config keys that never change the compiled steps (logging, progress, checkpoint
# cadence, the init hook's batch count): left out of the cache key, so that runs which
# differ only there (e.g. the methods of `nio-jax compare`) share one compilation.
_NOT_IN_STEPS = (
  "progress",
  "plots",
  "log_every",
  "max_to_keep",
  "checkpoint_every_steps",
  "init_num_batches",
  "gc_every",
  "eval_batch_size",
)


def _step_config_key(config) -> str:
  """The part of the training config that the compiled steps depend on, as sorted JSON."""
  d = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_STEPS}
  return json.dumps(d, sort_keys=True, default=str)


def build_steps(model, config, spe: int, has_bs: bool, no_norm: bool):
  """``(jitted train_step, jitted eval_step, tx, schedule)``, cached on (model, config,
  steps per epoch, ...) so that repeated / resumed runs in one process compile once."""
  try:
    key = (
      model,
      _step_config_key(config),
      spe,
      has_bs,
      no_norm,
      jax.default_backend(),
    )
    hash(key)
  except TypeError:  # an unhashable model attribute: no caching
    key = None
  if key is not None and key in _STEP_CACHE:
    _STEP_CACHE.move_to_end(key)
    return _STEP_CACHE[key]
  tx, schedule = make_optimizer(config, None, spe, no_norm=no_norm)
  train_kwarg = config.train_kwarg
  mp = bool(config.mixed_precision)
  compute_model = model
  if mp and hasattr(model, "dtype"):
    compute_model = model.clone(dtype=jnp.bfloat16)

  def forward(params, batch_stats, x, train, rng):
    v = {"params": params}
    if has_bs:
      v["batch_stats"] = batch_stats
    if mp:
      x = x.astype(jnp.bfloat16)
      if compute_model is model:
        v = {**v, "params": _cast_floats(params, jnp.bfloat16)}
    kw = {train_kwarg: train} if train_kwarg else {}
    if train and has_bs:
      logits, upd = compute_model.apply(v, x, mutable=["batch_stats"], rngs={"dropout": rng}, **kw)
      return logits.astype(jnp.float32), _cast_floats(upd["batch_stats"], jnp.float32)
    out = compute_model.apply(v, x, rngs={"dropout": rng} if train else None, **kw)
    return out.astype(jnp.float32), batch_stats

  smoothing = float(config.label_smoothing)

  def train_step(st, acc, batch):
    step = st["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(st["rng"]), step)
    labels = batch["label"]

    def loss_fn(params):
      logits, new_bs = forward(params, st.get("batch_stats"), batch["image"], True, rng)
      loss = _cross_entropy(logits, labels, logits.shape[-1], smoothing).mean()
      return loss, (logits, new_bs)

    (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    params = optax.apply_updates(st["params"], updates)
    bad = jnp.where((st["bad_step"] < 0) & ~jnp.isfinite(loss), step, st["bad_step"])
    new = {**st, "step": step + 1, "params": params, "opt_state": opt_state, "bad_step": bad}
    if has_bs:
      new["batch_stats"] = new_bs
    n = labels.shape[0]
    correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    acc = acc + jnp.stack([loss * n, correct, jnp.float32(n)])[None, :]
    return new, acc

  def eval_step(params, batch_stats, batch):
    logits, _ = forward(params, batch_stats, batch["image"], False, None)
    losses = _cross_entropy(logits, batch["label"], logits.shape[-1], 0.0)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    m = batch["mask"]
    return jnp.stack([jnp.sum(losses * m), jnp.sum(correct * m)])

  donate = () if jax.default_backend() == "cpu" else (0, 1)
  # canonical_convs: the scanned blocks' backward convolutions on XLA:CPU (see per_example).
  p_train_step = jax.jit(canonical_convs(train_step), donate_argnums=donate)
  p_eval_step = jax.jit(eval_step)
  out = (p_train_step, p_eval_step, tx, schedule)
  if key is not None:
    _STEP_CACHE[key] = out
    while len(_STEP_CACHE) > 4:
      _STEP_CACHE.popitem(last=False)
  return out


def _device_prefetch(
  it: Iterable[dict], size: int = 2, put: Callable = jax.device_put
) -> Iterator[dict]:
  """Start the (asynchronous) host-to-device copy of the next ``size - 1`` batches while
  the current step runs (``put``: ``jax.device_put``, or sharding over a mesh)."""
  buf: list = []
  for b in it:
    buf.append(put(b))
    if len(buf) >= size:
      yield buf.pop(0)
  while buf:
    yield buf.pop(0)


def _meta(meta: dict, g: int, spe: int) -> dict:
  epoch, step_in_epoch = divmod(g, spe)
  return to_jsonable(
    {
      **meta,
      "step": g,
      "epoch": epoch,
      "step_in_epoch": step_in_epoch,
      "loader": {"epoch": epoch, "step": step_in_epoch},
      "steps_per_epoch": spe,
    }
  )


def _finish_plots(config, log: MetricsLog, workdir: pathlib.Path) -> None:
  if not config.plots:
    return
  try:
    plot_curves(log.read(), workdir / "curves.png", title=workdir.name)
  except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
    log.write({"type": "warning", "step": -1, "message": f"plot failed: {e!r}"})
