"""One process of the multi-process tests (tests/test_multiprocess.py).

Run as `python -m tests.multiprocess_worker MODE OUT [--coordinator HOST:PORT --num-processes N
--process-id I]`, with `XLA_FLAGS=--xla_force_host_platform_device_count=D` set by the caller
(D local CPU devices). Every process builds the same global batches from fixed keys and feeds
only its own rows (`shard_batch(..., global_batch=False)`); without a coordinator it is the
single-process reference (the whole batch on one mesh over its local devices).

Modes:
  methods: NIO sample-wise and batch setting, GradInit, MetaInit, LSUV on a tiny conv net;
    process 0 (or the single process) writes their scales / params / histories to OUT (.npz).
  hang: NIO searches in a loop until killed (the fault tests kill one process mid-search).
  train: a short data-parallel training run (tests/test_train.py's setup) into OUT/.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from nio_jax import distributed

STEPS = 3
B = 8


def parse(argv):
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=("methods", "hang", "train"))
  p.add_argument("out")
  p.add_argument("--coordinator")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--init-timeout", type=int, default=60)
  p.add_argument("--heartbeat-timeout", type=int, default=10)
  p.add_argument("--sigterm-at", type=int, default=0, help="train: SIGTERM itself at this step")
  p.add_argument("--kill-at", type=int, default=0, help="train: the last process SIGKILLs itself")
  p.add_argument("--checkpoint-every", type=int, default=0, help="train: checkpoint every N steps")
  p.add_argument("--no-mesh", dest="mesh", action="store_false", help="train: no mesh")
  return p.parse_args(argv)


def local_rows(batch):
  """This process's rows of a global batch (process i holds rows i*B/P ... (i+1)*B/P)."""
  n, i = jax.process_count(), jax.process_index()
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[i * B // n : (i + 1) * B // n], batch)


def flat(prefix, tree, out):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(distributed.to_host(leaf))


def dropout_conv_loss(params, batch):
  """A stochastic loss (`rng_seed`): input dropout from the batch's key (nio_jax.stochastic),
  so the searches attach per-example keys that must shard with the examples."""
  from nio_jax import stochastic
  from tests import tiny_models as tm

  data, key = stochastic.split(batch)
  x = data["x"]
  if key is not None:
    x = x * jax.random.bernoulli(key, 0.7, x.shape) / 0.7
  return tm.conv_loss(params, {**data, "x": x})


dropout_conv_loss.rng_seed = 0


def run_methods(out_path, mesh):
  from nio_jax import methods
  from tests import tiny_models as tm

  params = tm.conv_params(jax.random.PRNGKey(0))
  full = [tm.conv_batch(jax.random.PRNGKey(i), b=B) for i in range(STEPS)]
  batches = [distributed.shard_batch(local_rows(b), mesh, global_batch=False) for b in full]
  runs = {
    "nio_sw": ("nio", {"num_steps": STEPS, "lr": 0.05}),
    "nio_batch": ("nio", {"num_steps": STEPS, "lr": 0.05, "num_chunks": 4, "overlap": 0.2}),
    "gradinit": ("gradinit", {"num_steps": STEPS, "batch_size": None, "lr": 0.05}),
    "metainit": ("metainit", {"num_steps": STEPS}),
    "lsuv": ("lsuv", {"orthonormal": False}),
    "nio_sw_dropout": ("nio", {"num_steps": STEPS, "lr": 0.05}),
  }
  res = {}
  for name, (method, cfg) in runs.items():
    t = time.perf_counter()
    loss = dropout_conv_loss if name.endswith("_dropout") else tm.conv_loss
    r = methods.initialize(method, loss, params, batches, cfg, mesh=mesh)
    flat(f"{name}/params", r.params, res)
    if r.scales is not None:
      flat(f"{name}/scales", r.scales, res)
    for k, v in r.history.items():
      v = np.asarray(v)
      if v.dtype.kind in "fiub":
        res[f"{name}/history/{k}"] = v
    print(f"[process {jax.process_index()}] {name} {time.perf_counter() - t:.1f}s", flush=True)
  # GradCosine of a global batch outside a search (check_stats reads the sharded norms)
  from nio_jax import cosine

  st = cosine.gradcosine(tm.conv_loss, distributed.replicate(params, mesh), batches[0])
  res["gradcosine/gc"] = np.asarray(distributed.to_host(st.gc))
  res["gradcosine/grad_norms"] = np.asarray(distributed.to_host(st.grad_norms))
  if jax.process_index() == 0:
    np.savez(out_path, **res)


def run_hang(mesh):
  import nio_jax
  from tests import tiny_models as tm

  params = tm.mlp_params(jax.random.PRNGKey(0))
  full = [tm.mlp_batch(jax.random.PRNGKey(i), b=B) for i in range(2)]
  batches = [distributed.shard_batch(local_rows(b), mesh, global_batch=False) for b in full]
  i = 0
  while True:
    nio_jax.nio(tm.mlp_loss, params, batches, {"num_steps": 2, "lr": 0.01}, mesh=mesh)
    if i == 0:
      print(f"[process {jax.process_index()}] searching", flush=True)
    i += 1


class SigtermAt:
  """A loader that sends SIGTERM (or `sig`) to its own process when batch `at` (global step)
  is drawn, mid-run, as a preemptible machine's scheduler would (SIGKILL: a crash)."""

  def __init__(self, loader, at: int, sig=None):
    import signal

    self.loader, self.at, self.sig = loader, at, signal.SIGTERM if sig is None else sig

  def __getattr__(self, name):
    return getattr(self.loader, name)

  def epoch(self, epoch, start_step=0):
    import os

    g = epoch * self.loader.steps_per_epoch + start_step
    for batch in self.loader.epoch(epoch, start_step):
      g += 1
      if g == self.at:
        os.kill(os.getpid(), self.sig)
      yield batch


def run_train(out, mesh, sigterm_at, kill_at=0, checkpoint_every=0):
  import pathlib
  import signal

  from nio_jax import train
  from tests.test_train import make_setup, tiny_config

  model, variables, loader, test_set = make_setup(bn=True)
  if sigterm_at and jax.process_index() == 0:
    loader = SigtermAt(loader, sigterm_at)
  if kill_at and jax.process_index() == jax.process_count() - 1:
    loader = SigtermAt(loader, kill_at, signal.SIGKILL)
  # 3 epochs (18 steps): JAX's preemption sync point can come several steps after the SIGTERM
  # (8 in one loaded CI run), and it must fall before the last step for the run to stop early
  cfg = tiny_config(num_epochs=3, eval_batch_size=20)
  if checkpoint_every:
    cfg.checkpoint_every_steps = checkpoint_every
  out = pathlib.Path(out)
  r = train.train(model, variables, loader, test_set, cfg, out / "run", mesh=mesh)
  res = {}
  flat("variables", r.variables, res)
  res["evals/test_acc"] = np.asarray([e["test_acc"] for e in r.evals])
  res["evals/train_loss"] = np.asarray([e["train_loss"] for e in r.evals])
  res["step"] = np.asarray(r.step)
  if jax.process_index() == 0:
    np.savez(out / "result.npz", **res)


def main(argv=None):
  a = parse(argv)
  if a.coordinator:
    distributed.initialize_multihost(
      coordinator_address=a.coordinator,
      num_processes=a.num_processes,
      process_id=a.process_id,
      initialization_timeout=a.init_timeout,
      heartbeat_timeout_seconds=a.heartbeat_timeout,
    )
  mesh = distributed.make_mesh()
  print(
    f"[process {jax.process_index()}/{jax.process_count()}] "
    f"{jax.local_device_count()} local / {jax.device_count()} devices",
    flush=True,
  )
  if a.mode == "methods":
    run_methods(a.out, mesh)
  elif a.mode == "hang":
    run_hang(mesh)
  elif a.mode == "train":
    run_train(a.out, mesh if a.mesh else None, a.sigterm_at, a.kill_at, a.checkpoint_every)
  print(f"[process {jax.process_index()}] OK", flush=True)


if __name__ == "__main__":
  sys.exit(main())
