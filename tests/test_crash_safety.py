"""Crash safety: a training process SIGKILLed while it writes a checkpoint resumes, in a new
process, from the last complete checkpoint and finishes with exactly (bit for bit on CPU) the
params of an uninterrupted run.

The child trains a tiny CNN with a checkpoint after every step. Its orbax commit (the rename
of `<step>.orbax-checkpoint-tmp-*` to `<step>`) is slowed down so the first kill lands
deterministically *inside* a save: the data are written but not committed. A second child is
killed at a random moment (seeded). A third resumes to the end."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import asyncio, pathlib, sys
    import numpy as np
    workdir, out, commit_delay = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    from orbax.checkpoint._src.path import async_path
    _rename = async_path.rename

    async def slow_rename(src, dst):
      if dst.name.isdigit():  # the commit of a step directory
        print("COMMITTING", dst.name, flush=True)
        await asyncio.sleep(commit_delay)
      return await _rename(src, dst)

    async_path.rename = slow_rename
    import jax
    from nio_jax import train
    from tests.test_train import make_setup, tiny_config
    model, variables, loader, test_set = make_setup(bn=True)
    cfg = tiny_config(num_epochs=2, checkpoint_every_steps=1, log_every=1, max_to_keep=2)
    print("STARTED", flush=True)
    r = train.train(model, variables, loader, test_set, cfg, workdir)
    assert r.finished
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(r.variables)}
    np.savez(out, **flat)
    print("DONE", r.step, flush=True)
""")


def _child(workdir, out, delay):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.Popen(
    [sys.executable, "-u", "-c", CHILD, str(workdir), str(out), str(delay)],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _read_until(proc, prefix, count=1, deadline=300):
  t0, seen = time.time(), 0
  for line in proc.stdout:
    if line.startswith(prefix):
      seen += 1
      if seen == count:
        return line.split()
    assert time.time() - t0 < deadline, f"no {prefix!r} line"
  raise AssertionError(f"child exited before {prefix!r}: {proc.stderr.read()[-3000:]}")


def _finalised_steps(ckdir):
  return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())


def _records(wd):
  from nio_jax.train import read_metrics

  return read_metrics(wd / "metrics.jsonl")


def _resumes(wd):
  return [r["step"] for r in _records(wd) if r["type"] == "resume"]


def _kept_prefix(log_text, step):
  """The lines of a log up to `step`: what a resume from `step` must keep verbatim."""
  keep = []
  for ln in log_text.splitlines(keepends=True):
    try:
      rec = json.loads(ln)
    except json.JSONDecodeError:  # a line cut by the kill
      continue
    if rec.get("step", -1) <= step:
      keep.append(ln)
  return "".join(keep)


def test_sigkill_during_checkpoint_write_then_resume_is_bit_for_bit(tmp_path):
  ref = _child(tmp_path / "reference", tmp_path / "reference.npz", 0.0)  # runs alongside
  wd, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"

  # 1. Kill inside the 4th save: its files are written, the commit rename has not happened.
  p = _child(wd, tmp_path / "unused.npz", 5.0)
  _, step = _read_until(p, "COMMITTING", count=4)
  p.send_signal(signal.SIGKILL)
  p.wait()
  tmp_dirs = [q.name for q in ck.iterdir() if "orbax-checkpoint-tmp" in q.name]
  assert tmp_dirs, "the kill did not land inside a save"
  assert int(step) not in _finalised_steps(ck)
  assert _finalised_steps(ck)[-1] == int(step) - 1  # the last complete checkpoint survived

  survivor = _finalised_steps(ck)[-1]
  log_1 = (wd / "metrics.jsonl").read_text()

  # 2. Resume, and kill at a random moment (seeded) after a few more steps.
  rng = random.Random(0)
  p = _child(wd, tmp_path / "unused.npz", 0.0)
  _read_until(p, "COMMITTING", count=2)
  time.sleep(rng.uniform(0.0, 0.5))
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert _resumes(wd) == [survivor]  # from the checkpoint that survived the first kill
  assert _kept_prefix(log_1, survivor) in (wd / "metrics.jsonl").read_text()
  assert _finalised_steps(ck)  # something complete to resume from
  survivor_2 = _finalised_steps(ck)[-1]
  assert survivor_2 > survivor  # the second child made progress before its kill

  # 3. Resume to the end in a fresh process.
  p = _child(wd, tmp_path / "resumed.npz", 0.0)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert "DONE 12" in out
  assert not [q for q in ck.iterdir() if "orbax-checkpoint-tmp" in q.name]  # cleaned up
  # The log is one continued run: one config record, one resume record per restart (from the
  # last complete checkpoint), every training step exactly once.
  recs = _records(wd)
  assert _resumes(wd) == [survivor, survivor_2]
  assert [r["type"] for r in recs].count("config") == 1
  assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 13))

  out, err = ref.communicate(timeout=600)
  assert ref.returncode == 0, err[-3000:]
  a, b = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
