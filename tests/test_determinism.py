"""Determinism: the same seed and config give bit-identical scales, params and histories on
CPU for every method (NIO batch / sample-wise, GradInit SGD / Adam, MetaInit on random and real
data, Fixup, Kaiming) and for a short training run.

Each method runs twice in the test process, and once more in a fresh process (fresh compiles)
started with another `PYTHONHASHSEED` (dict / set ordering must not leak into the results);
the digests of all three results must be equal."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from nio_jax import methods, models, train
from tests import tiny_models as tm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def digest(*trees):
  h = hashlib.sha256()
  for t in trees:
    for path, x in jax.tree_util.tree_leaves_with_path(t):
      a = np.asarray(x)
      h.update(jax.tree_util.keystr(path).encode())
      h.update(str(a.dtype).encode())
      h.update(a.tobytes())
  return h.hexdigest()


params = tm.mlp_params(jax.random.PRNGKey(0))
batches = [tm.mlp_batch(jax.random.PRNGKey(i), b=8) for i in range(4)]


def fixup_params():
  model = models.get("resnet20", depth=8, width=2, variant="fixup", fixup_rescale=False)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
    lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes["params"]
  )


RUNS = {
  "nio_batch": lambda: methods.initialize(
    "nio", tm.mlp_loss, params, batches, {"num_steps": 3, "lr": 0.05}
  ),
  "nio_samplewise": lambda: methods.initialize(
    "nio",
    tm.mlp_loss,
    params,
    batches,
    {"num_steps": 3, "lr": 0.05, "num_chunks": None, "overlap": 0.0},
  ),
  "gradinit": lambda: methods.initialize(
    "gradinit", tm.mlp_loss, params, batches, {"num_steps": 3, "batch_size": None, "lr": 0.05}
  ),
  "gradinit_adam": lambda: methods.initialize(
    "gradinit_adam", tm.mlp_loss, params, batches, {"num_steps": 3}
  ),
  "metainit_random": lambda: methods.initialize(
    "metainit",
    tm.mlp_loss,
    params,
    {"x": (8, 5), "num_classes": 3, "label_key": "y"},
    {"num_steps": 3, "seed": 7},
  ),
  "metainit_real": lambda: methods.initialize(
    "metainit", tm.mlp_loss, params, batches, {"num_steps": 3, "variant": "rescale_adam"}
  ),
  "fixup": lambda: methods.initialize("fixup", None, fixup_params(), None),
  "kaiming": lambda: methods.initialize("kaiming", None, params, None),
}


def train_run():
  from tests.test_train import make_setup, tiny_config

  model, variables, loader, test_set = make_setup(bn=True, augment=True)
  with tempfile.TemporaryDirectory() as d:
    r = train.train(
      model, variables, loader, test_set, tiny_config(num_epochs=1, max_to_keep=2), pathlib.Path(d)
    )
  return r.variables, [r.acc_1, r.final_test_acc]


def all_digests(repeats):
  """{name: sha256 of the result}; each run `repeats` times in this process (all equal)."""
  out = {}
  for name, fn in list(RUNS.items()) + [("train", None)]:
    digests = []
    for _ in range(repeats):
      if name == "train":
        v, accs = train_run()
        digests.append(digest(v, accs))
      else:
        r = fn()
        hist = {k: np.asarray(v) for k, v in r.history.items()}
        digests.append(digest(r.params, r.scales if r.scales is not None else {}, hist))
    assert len(set(digests)) == 1, f"{name}: two runs in one process differ"
    out[name] = digests[0]
  return out


def test_every_method_and_training_are_bit_identical_across_runs_and_processes():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONHASHSEED="12345")
  code = (
    "import json; from tests.test_determinism import all_digests; "
    "print('DIGESTS ' + json.dumps(all_digests(1)))"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    here = all_digests(2)
    stdout, stderr = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  there = json.loads([l for l in stdout.splitlines() if l.startswith("DIGESTS ")][-1][8:])
  assert here == there
  assert set(here) == {
    "nio_batch",
    "nio_samplewise",
    "gradinit",
    "gradinit_adam",
    "metainit_random",
    "metainit_real",
    "fixup",
    "kaiming",
    "train",
  }
