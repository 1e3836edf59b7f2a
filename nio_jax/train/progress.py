"""What a training run records: its progress (kept in each checkpoint, restored on resume)
and the result `nio_jax.train.train` returns."""

from __future__ import annotations

import dataclasses

from nio_jax.files import to_jsonable


@dataclasses.dataclass
class TrainResult:
  """What `nio_jax.train.train` returns.

  Attributes:
    variables: final `{"params": ..., "batch_stats": ...}` (batch_stats only for BN models).
    acc_1: test accuracy after the first epoch that ran (for a "+1 epoch" baseline, that is
      the extra epoch).
    acc_1_main: test accuracy after the first epoch of the main schedule (= `acc_1` when
      `baseline == "none"`; after 2 epochs for the "+1 epoch" baselines).
    acc_best: best test accuracy over the evaluated epochs.
    final_test_acc: test accuracy after the last completed epoch.
    epochs_completed: complete epochs at the end of this call.
    step: the global step reached.
    evals: the per-epoch evaluation records.
    finished: False when the run stopped early (`stop_after_step`).
    step_evals: test accuracy at the steps of `eval_at` (`{step: acc}`).
    train_seconds: wall time of the training steps in this call (evaluations excluded).
    eval_seconds: wall time of the evaluations (epoch ends and `eval_at`) in this call.
    gc_steps: `{step: gc_fn result}` of `config.gc_every` (empty when off), over the
      whole run (kept across resumes).
    gc_seconds: wall time of the `gc_fn` calls in this call (not in `train_seconds`).
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
  train_seconds: float = 0.0
  eval_seconds: float = 0.0
  gc_steps: dict = dataclasses.field(default_factory=dict)
  gc_seconds: float = 0.0


@dataclasses.dataclass
class Progress:
  """What a training run has recorded so far.

  Each checkpoint's `meta` holds it (`meta`), and a resumed run starts from the
  checkpoint's (`from_meta`).

  Attributes:
    acc_1: test accuracy after the first epoch.
    acc_1_main: test accuracy after the first epoch of the main schedule.
    acc_best: best test accuracy over the epochs.
    evals: the per-epoch evaluation records.
    step_evals: `{step: test accuracy}` of the extra evaluations (`eval_at`).
    gc_steps: `{step: gc_fn result}` (`gc_every`).
    epoch_sums: the epoch's accumulators `[loss * n, correct, n]` at a mid-epoch
      checkpoint.
  """

  acc_1: float | None = None
  acc_1_main: float | None = None
  acc_best: float | None = None
  evals: list = dataclasses.field(default_factory=list)
  step_evals: dict = dataclasses.field(default_factory=dict)  # {step: test accuracy}
  gc_steps: dict = dataclasses.field(default_factory=dict)  # {step: gc_fn result}
  epoch_sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])

  @classmethod
  def from_meta(cls, meta: dict) -> Progress:
    """The record of a checkpoint's `meta`."""
    return cls(
      acc_1=meta["acc_1"],
      acc_1_main=meta["acc_1_main"],
      acc_best=meta["acc_best"],
      evals=list(meta["evals"]),
      step_evals={int(k): v for k, v in meta.get("step_evals", {}).items()},
      gc_steps={int(k): v for k, v in meta.get("gc_steps", {}).items()},
      epoch_sums=list(meta.get("epoch_sums", [0.0, 0.0, 0.0])),
    )

  def meta(self, step: int, steps_per_epoch: int) -> dict:
    """The checkpoint `meta` of global step `step`: the record and the loader position."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    return to_jsonable(
      {
        **dataclasses.asdict(self),
        "step": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "loader": {"epoch": epoch, "step": step_in_epoch},
        "steps_per_epoch": steps_per_epoch,
      }
    )

  def add_epoch_eval(self, rec: dict, epoch: int, baseline: str) -> None:
    """Records the evaluation `rec` of 0-based `epoch` (Acc_1, Acc_1 of the main schedule,
    Acc_best)."""
    test_acc = rec["test_acc"]
    self.evals.append(to_jsonable(rec))
    if self.acc_1 is None:
      self.acc_1 = test_acc
    if epoch + 1 == (1 if baseline == "none" else 2):
      self.acc_1_main = test_acc
    if self.acc_best is None or test_acc > self.acc_best:
      self.acc_best = test_acc
