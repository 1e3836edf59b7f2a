"""Several JAX processes on localhost, one global mesh (JAX's multi-controller runtime on CPU).

Each test starts worker processes (`tests/multiprocess_worker.py`) that join one coordinator
on a free port, build a mesh over every process's CPU devices and feed their own rows of each
global batch. The single-process reference runs in its own subprocess with the same total
number of devices. Every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def worker_env(devices: int, **extra) -> dict:
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
    PYTHONUNBUFFERED="1",
  )
  for k in ("NIO_JAX_COORDINATOR", "NIO_JAX_NUM_PROCESSES", "NIO_JAX_PROCESS_ID"):
    env.pop(k, None)
  env.update(extra)
  return env


def start(args, devices: int, log: pathlib.Path, **env) -> subprocess.Popen:
  with open(log, "w") as f:
    return subprocess.Popen(
      [sys.executable, "-m", "tests.multiprocess_worker", *map(str, args)],
      cwd=ROOT,
      env=worker_env(devices, **env),
      stdout=f,
      stderr=subprocess.STDOUT,
    )


def start_group(mode, out, n, devices, tmp_path, *extra, port=None):
  """`n` worker processes of one run, each with `devices` local CPU devices."""
  port = port or free_port()
  procs = []
  for i in range(n):
    args = [mode, out, "--coordinator", f"localhost:{port}", "--num-processes", n]
    procs.append(start([*args, "--process-id", i, *extra], devices, tmp_path / f"{mode}{i}.log"))
  return procs


def wait_all(procs, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return codes


def logs(tmp_path) -> str:
  return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))


@pytest.mark.slow  # two processes + the reference compile every method: ~60-90 s on 2 cores
def test_methods_two_processes_equal_single_process(tmp_path):
  """NIO (sample-wise and batch setting), GradInit, MetaInit and LSUV run as 2 processes x 2
  CPU devices on one 4-device mesh, each process feeding half of every batch, give the result
  of one process with 4 devices. So does a stochastic loss (input dropout): the per-example
  keys the search attaches (nio_jax.stochastic) shard with their examples."""
  ref = start(["methods", tmp_path / "ref.npz"], 4, tmp_path / "ref.log")
  procs = start_group("methods", tmp_path / "mp.npz", 2, 2, tmp_path)
  codes = wait_all([*procs, ref])
  assert codes == [0, 0, 0], logs(tmp_path)
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "mp.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in ("nio_sw", "nio_batch", "gradinit", "metainit", "lsuv", "nio_sw_dropout"):
    assert any(k.startswith(name + "/") for k in a.files), name
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # The dropout really acted (its search differs from the deterministic one).
  assert not np.allclose(a["nio_sw_dropout/history/gc"], a["nio_sw/history/gc"])
  log = (tmp_path / "methods1.log").read_text()
  assert "[process 1/2] 2 local / 4 devices" in log, log


def test_unreachable_coordinator_fails_fast_and_clearly(tmp_path):
  """A process whose coordinator never answers raises DistributedInitError naming the
  address and the fix after `initialization_timeout`, instead of JAX's fatal abort."""
  port = free_port()  # nothing listens there
  args = ["methods", tmp_path / "x.npz", "--coordinator", f"localhost:{port}"]
  t = time.monotonic()
  p = start(
    [*args, "--num-processes", 2, "--process-id", 1, "--init-timeout", 3], 1, tmp_path / "w.log"
  )
  code = wait_all([p], timeout=120)[0]
  elapsed = time.monotonic() - t
  log = (tmp_path / "w.log").read_text()
  assert code != 0, log
  assert "DistributedInitError" in log and f"localhost:{port} did not answer within 3 s" in log
  assert "Start process 0" in log, log
  assert elapsed < 60, elapsed


def wait_for_text(path: pathlib.Path, text: str, timeout: float, procs=()) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists() and text in path.read_text():
      return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.5)
  raise AssertionError(f"{text!r} not in {path.name} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_killed_process_stops_the_others(tmp_path, killed):
  """One of two processes killed (SIGKILL) in the middle of NIO searches, a worker or the
  coordinator (process 0): the survivor stops within a bounded time (the heartbeat timeout,
  here 5 s, plus slack) with an error that says the other process died, instead of waiting
  forever in a collective."""
  procs = start_group("hang", tmp_path / "x", 2, 2, tmp_path, "--heartbeat-timeout", 5)
  survivor = 1 - killed
  try:
    for i in range(2):
      wait_for_text(tmp_path / f"hang{i}.log", "searching", TIMEOUT, procs)
    procs[killed].kill()
    t = time.monotonic()
    code = wait_all([procs[survivor]], timeout=90)[0]
    elapsed = time.monotonic() - t
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  log = (tmp_path / f"hang{survivor}.log").read_text()
  print(f"survivor stopped {elapsed:.1f} s after the kill, exit code {code}")
  print("\n".join(line for line in log.splitlines() if not line.startswith("    @"))[-2000:])
  assert code != 0, log
  assert elapsed < 60, (elapsed, log[-3000:])
  assert "JAX distributed service detected fatal errors" in log, log[-3000:]


def assert_same_result(ref: pathlib.Path, other: pathlib.Path, logs_text: str = "") -> None:
  a, b = np.load(ref), np.load(other)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{k}\n{logs_text}")


def records(workdir: pathlib.Path) -> list[dict]:
  from nio_jax import train

  return train.read_metrics(workdir / "run" / "metrics.jsonl")


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
  """SIGTERM (a preemption) in the middle of an epoch: `train` checkpoints the step reached
  and exits with code 143; the same command resumes and ends equal to an uninterrupted run."""
  ref = start(["train", tmp_path / "ref", "--no-mesh"], 1, tmp_path / "ref.log")
  cut = start(["train", tmp_path / "cut", "--no-mesh", "--sigterm-at", 4], 1, tmp_path / "cut.log")
  assert wait_all([ref, cut]) == [0, 143], logs(tmp_path)
  assert "SIGTERM: training stopped at step" in (tmp_path / "cut.log").read_text()
  again = start(["train", tmp_path / "cut", "--no-mesh"], 1, tmp_path / "again.log")
  assert wait_all([again]) == [0], logs(tmp_path)
  assert_same_result(tmp_path / "ref" / "result.npz", tmp_path / "cut" / "result.npz")
  rec = records(tmp_path / "cut")
  stopped = [r["step"] for r in rec if r["type"] == "preempted"]
  assert len(stopped) == 1 and 1 <= stopped[0] < 6, stopped  # mid-epoch (6 steps per epoch)
  assert [r["step"] for r in rec if r["type"] == "resume"] == stopped


@pytest.mark.slow  # ~40 s on 2 cores
def test_training_two_processes_sigterm_and_resume_in_both_layouts(tmp_path):
  """Data-parallel training as 2 processes x 1 CPU device: SIGTERM to process 0 mid-epoch
  stops both at the same step with one checkpoint (JAX's preemption sync point); resumed as
  2 processes, or as 1 process x 2 devices from the same checkpoint, the run ends equal
  (exactly, here) to an uninterrupted single-process run on 2 devices. Only process 0 writes
  the metrics log; every process's lines say which process it is."""
  ref = start(["train", tmp_path / "ref"], 2, tmp_path / "ref.log")
  procs = start_group("train", tmp_path / "mp", 2, 1, tmp_path, "--sigterm-at", 4)
  assert wait_all([*procs, ref]) == [143, 143, 0], logs(tmp_path)
  for i in range(2):
    log = (tmp_path / f"train{i}.log").read_text()
    assert f"[process {i}/2] SIGTERM: training stopped at step" in log, log
  import shutil

  shutil.copytree(tmp_path / "mp", tmp_path / "one")
  for p in tmp_path.glob("train*.log"):
    p.rename(p.with_suffix(".first.log"))
  procs = start_group("train", tmp_path / "mp", 2, 1, tmp_path)
  one = start(["train", tmp_path / "one"], 2, tmp_path / "one.log")
  assert wait_all([*procs, one]) == [0, 0, 0], logs(tmp_path)
  for d in ("mp", "one"):
    assert_same_result(tmp_path / "ref" / "result.npz", tmp_path / d / "result.npz", logs(tmp_path))
  rec = records(tmp_path / "mp")
  assert [r["type"] for r in rec].count("config") == 1, rec  # process 1 wrote nothing
  assert [r["type"] for r in rec].count("preempted") == 1, rec
  assert [r["type"] for r in rec].count("eval") == 3, rec  # one per epoch (3 epochs)


@pytest.mark.slow  # ~60 s on 2 cores
def test_training_process_killed_then_restart_resumes_exactly(tmp_path):
  """Data-parallel training as 2 processes x 1 device, checkpointing every 2 steps: process
  1 is killed (SIGKILL, no chance to checkpoint) when it draws batch 9, in the second epoch.
  Process 0 stops within the heartbeat timeout with an error instead of hanging; restarted,
  both resume from the last complete checkpoint and end equal to an uninterrupted run."""
  ref = start(["train", tmp_path / "ref", "--checkpoint-every", 2], 2, tmp_path / "ref.log")
  procs = start_group(
    "train",
    tmp_path / "mp",
    2,
    1,
    tmp_path,
    "--kill-at",
    9,
    "--checkpoint-every",
    2,
    "--heartbeat-timeout",
    5,
  )
  codes = wait_all([*procs, ref])
  assert codes[1] == -9 and codes[0] != 0 and codes[2] == 0, (codes, logs(tmp_path))
  log0 = (tmp_path / "train0.log").read_text()
  assert "JAX distributed service detected fatal errors" in log0, log0[-3000:]
  for p in tmp_path.glob("train*.log"):
    p.rename(p.with_suffix(".first.log"))
  procs = start_group("train", tmp_path / "mp", 2, 1, tmp_path, "--checkpoint-every", 2)
  assert wait_all(procs) == [0, 0], logs(tmp_path)
  assert_same_result(
    tmp_path / "ref" / "result.npz", tmp_path / "mp" / "result.npz", logs(tmp_path)
  )
  resumed = [r["step"] for r in records(tmp_path / "mp") if r["type"] == "resume"]
  # A checkpoint taken before the kill (which ones completed depends on when the killed
  # process drew batch 9 and on Orbax's commit; any complete one resumes exactly).
  assert resumed and 2 <= resumed[-1] < 9, resumed


CLI_SETS = [
  "model.name=mlp",
  "model.kwargs={'hidden': (32,)}",
  "data.train_subset=256",
  "data.test_subset=256",
  "data.batch_size=64",
  "data.prefetch=0",
  "init.batch_size=32",
  "init.config.num_steps=3",
  "init.measure_batches=0",
  "train.num_epochs=1",
  "train.eval_batch_size=256",
  "train.log_every=2",
]


NIO_CLI = [sys.executable, "-c", "import sys; from nio_jax.cli import main; sys.exit(main())"]


def start_cli(args, workdir, log: pathlib.Path, processes: int = 1, extra=()):
  """`nio-jax ARGS --workdir WORKDIR` as one process, or as `processes` processes of one CPU
  device each through the documented launcher (`scripts/launch_local.sh N -- ...`)."""
  cmd = [*NIO_CLI, *args, "--workdir", workdir, *extra]
  env = worker_env(1)
  if processes > 1:
    cmd = [str(ROOT / "scripts" / "launch_local.sh"), str(processes), "--", *cmd]
    env = worker_env(1, NIO_JAX_LOCAL_DEVICES="1")
    env.pop("XLA_FLAGS")
  with open(log, "w") as f:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def skip_without_fashion_mnist():
  from nio_jax.data import find_fashion_mnist_dir

  try:
    find_fashion_mnist_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.mark.slow  # ~60 s on 2 cores
def test_cli_train_two_processes_through_the_launcher(tmp_path):
  """`scripts/launch_local.sh 2 -- nio-jax train ...` (the documented command) trains one
  model with 2 processes and ends with the single-process run's accuracy and test loss;
  every printed line names its process, and the metrics log is written once."""
  skip_without_fashion_mnist()
  args = [
    "train",
    "--config",
    str(ROOT / "configs" / "fmnist_nio.py"),
    "--no-progress",
    *[f"--set={s}" for s in CLI_SETS],
  ]
  mp = start_cli(args, tmp_path / "mp", tmp_path / "mp.log", processes=2)
  one = start_cli(args, tmp_path / "one", tmp_path / "one.log")
  assert wait_all([mp, one]) == [0, 0], logs(tmp_path)
  log = (tmp_path / "mp.log").read_text()
  for i in range(2):
    assert f"[process {i}/2] nio-jax:" in log and f"[process {i}/2] plots:" in log, log
  from nio_jax import train

  evals = {}
  for d in ("mp", "one"):
    rec = train.read_metrics(tmp_path / d / "metrics.jsonl")
    assert [r["type"] for r in rec].count("config") == 1, rec
    evals[d] = [r for r in rec if r["type"] == "eval"]
  assert len(evals["mp"]) == len(evals["one"]) == 1
  a, b = evals["mp"][0], evals["one"][0]
  assert a["test_acc"] == b["test_acc"], (a, b)
  np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-4)
  np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
  # Records are written by process 0 alone (no per-process temporaries left behind), and a
  # rerun with --overwrite decides, clears and writes in step in both processes.
  assert not list((tmp_path / "mp").rglob("*.tmp")), list((tmp_path / "mp").rglob("*"))
  for name in ("run_record.json", "config.json", "report.md"):
    assert (tmp_path / "mp" / name).exists(), name
  again = start_cli(args, tmp_path / "mp", tmp_path / "mp2.log", processes=2, extra=["--overwrite"])
  assert wait_all([again]) == [0], logs(tmp_path)
  rec = train.read_metrics(tmp_path / "mp" / "metrics.jsonl")
  assert [r for r in rec if r["type"] == "eval"][0]["test_acc"] == a["test_acc"]


@pytest.mark.slow  # two processes + one, each training two methods: ~60-90 s on 2 cores
def test_cli_compare_two_processes_through_the_launcher(tmp_path):
  """`scripts/launch_local.sh 2 -- nio-jax compare ...` runs every method's train in both
  processes and writes one compare table (process 0), equal to the single-process one."""
  skip_without_fashion_mnist()
  args = [
    "compare",
    "--config",
    str(ROOT / "configs" / "fmnist_nio.py"),
    "--methods",
    "kaiming,nio",
    "--no-progress",
    *[f"--set={s}" for s in CLI_SETS],
  ]
  mp = start_cli(args, tmp_path / "mp", tmp_path / "cmp_mp.log", processes=2)
  one = start_cli(args, tmp_path / "one", tmp_path / "cmp_one.log")
  assert wait_all([mp, one]) == [0, 0], logs(tmp_path)
  log = (tmp_path / "cmp_mp.log").read_text()
  assert "[process 0/2]" in log and "[process 1/2]" in log, log
  got, want = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("mp", "one"))
  assert got["methods"] == want["methods"] == ["kaiming", "nio"]
  for m in ("kaiming", "nio"):
    a, b = got["records"][m], want["records"][m]
    assert a["final_test_acc"] == b["final_test_acc"], (m, a["final_test_acc"], b["final_test_acc"])
    assert a["acc_epochs"] == b["acc_epochs"], m
  assert (tmp_path / "mp" / "compare.md").exists()
  assert not list((tmp_path / "mp").rglob("*.tmp"))
