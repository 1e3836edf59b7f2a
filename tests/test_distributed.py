"""Data-parallel NIO over 8 simulated CPU devices equals the single-device result."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    import nio_jax
    from nio_jax import distributed, formulation
    from tests import tiny_models as tm
    key = jax.random.PRNGKey(0)
    params = tm.conv_params(key)
    batches = [tm.conv_batch(jax.random.PRNGKey(i), b=16) for i in range(3)]
    mesh = distributed.make_mesh()
    s0, _ = nio_jax.init_scales(params)
    for chunks, r in ((4, 0.2), (None, 0.0)):
      # The gradient of the NIO objective w.r.t. the scales: equal to float tolerance.
      def f(s, b, m=None):
        p = nio_jax.apply_scales(params, s)
        if m is not None and chunks is None:
          form = formulation.resolve_formulation(tm.conv_loss, p, b, None)
          st = nio_jax.cosine.samplewise_stats(tm.conv_loss, p, b, m, form)
        else:
          st = nio_jax.cosine.gradcosine_stats(tm.conv_loss, p, b, num_chunks=chunks, overlap=r)
        return nio_jax.nio_objective(st, "gc_gn_sqrt", 1.0)
      g1 = jax.jit(jax.grad(f))(s0, batches[0])
      g8 = jax.jit(jax.grad(f), static_argnums=2)(distributed.replicate(s0, mesh),
                                                  distributed.shard_batch(batches[0], mesh), mesh)
      for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
      # Whole searches agree too; Adam normalises each step, which magnifies float noise of
      # tiny scale gradients, hence the looser tolerance on the scales after 3 steps.
      cfg = {"num_steps": 3, "lr": 0.05, "num_chunks": chunks, "overlap": r}
      one = nio_jax.nio(tm.conv_loss, params, batches, cfg)
      many = nio_jax.nio(tm.conv_loss, params, batches, cfg, mesh=mesh)
      for a, b in zip(jax.tree_util.tree_leaves(one.scales), jax.tree_util.tree_leaves(many.scales)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-3)
      np.testing.assert_allclose(one.history["gc"], many.history["gc"], rtol=5e-3, atol=1e-5)
      sb = distributed.shard_batch(batches[0], mesh)
      assert len(sb["x"].sharding.device_set) == 8
    try:
      distributed.shard_batch(tm.conv_batch(key, b=12), distributed.make_mesh())
    except ValueError as e:
      assert "divisible" in str(e)
    else:
      raise AssertionError("expected ValueError")
    print("OK")
""")


def run_on_8_devices(script: str) -> str:
  """Runs `script` in a fresh interpreter with 8 simulated CPU devices; returns its stdout."""
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow  # 60-90 s on 2 cores: CI runs it (NIO_JAX_SLOW=1)
def test_data_parallel_nio_equals_single_device():
  assert "OK" in run_on_8_devices(SCRIPT)


GSPMD_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    import nio_jax
    from nio_jax import distributed
    from tests import tiny_models as tm
    params = tm.conv_params(jax.random.PRNGKey(0))
    b = tm.conv_batch(jax.random.PRNGKey(0), b=16)
    mesh = distributed.make_mesh()
    p8, b8 = distributed.replicate(params, mesh), distributed.shard_batch(b, mesh)

    def one(p, x, y):  # the loss of one example, as plain JAX writes vmap(grad)
      return tm.conv_loss(p, {"x": x[None], "y": y[None]})[0]

    raw = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))
    forms = {
      "raw": lambda p, bb: raw(p, bb["x"], bb["y"]),
      "lib": lambda p, bb: nio_jax.per_example_grads(tm.conv_loss, p, bb, pullback="vmap",
                                                     conv="none"),
      "im2col": lambda p, bb: nio_jax.per_example_grads(tm.conv_loss, p, bb, pullback="vmap",
                                                        conv="im2col"),
    }
    out = {}
    for name, f in forms.items():
      g1, g8 = f(params, b), f(p8, b8)
      for k in ("conv0", "conv1", "head"):
        a, c = np.asarray(g1[k]["kernel"]), np.asarray(g8[k]["kernel"])
        out[f"{name}/{k}"] = float(np.max(np.abs(a - c)) / np.max(np.abs(a)))
    print("ERR", json.dumps(out))
""")


def test_gspmd_vmap_conv_grads_are_checked():
  """Why sample-wise sharding uses shard_map: letting GSPMD partition plain JAX's
  `vmap(grad(conv))` gives wrong per-example kernel gradients on jax 0.10.2 / XLA:CPU (8
  simulated devices): the relative error of both conv kernels is of order 1, while the dense
  layer agrees. The library's own forms agree even under GSPMD: `per_example_grads` with
  `conv="none"` evaluates the convolutions in canonical layout on CPU
  (`jaxpr_rewrites.canonical_convs`), and `conv="im2col"` has no convolution to partition. The
  `shard_map` in `cosine.samplewise_stats` stays: canonical_convs is CPU-only, and the
  raw form shows the partitioner is still wrong. When a JAX upgrade fixes GSPMD, the first
  assertion fails: then the shard_map can go."""
  stdout = run_on_8_devices(GSPMD_SCRIPT)
  err = json.loads(stdout.split("ERR", 1)[1])
  print("GSPMD per-example kernel gradients, max relative error:", err)
  # The JAX bug: plain vmap(grad(conv)) kernels partitioned by GSPMD are wrong by O(1).
  assert err["raw/conv0"] > 0.5 and err["raw/conv1"] > 0.5, err
  # Everything else agrees to float tolerance.
  for k in ("raw/head", "lib/conv0", "lib/conv1", "lib/head", "im2col/conv0", "im2col/conv1"):
    assert err[k] < 1e-5, (k, err)


SCALE_OUT_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    import nio_jax
    from nio_jax import distributed, methods, train
    from tests import tiny_models as tm
    from tests.test_train import make_setup, tiny_config
    mesh = distributed.make_mesh()
    params = tm.conv_params(jax.random.PRNGKey(0))
    batches = [tm.conv_batch(jax.random.PRNGKey(i), b=16) for i in range(4)]

    def close(a, b, rtol):
      for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)

    runs = [("gradinit", batches, {"num_steps": 2, "batch_size": None, "lr": 0.05}),
            ("gradinit_adam", batches, {"num_steps": 2, "batch_size": None, "lookahead": "half"}),
            ("metainit", batches, {"num_steps": 2}),
            ("metainit", {"x": (16, 5, 5, 2), "num_classes": 3, "label_key": "y"},
             {"num_steps": 2, "variant": "rescale_adam", "lr": 0.01})]
    for name, data, cfg in runs:
      one = methods.initialize(name, tm.conv_loss, params, data, cfg)
      many = methods.initialize(name, tm.conv_loss, params, data, cfg, mesh=mesh)
      close(one.scales, many.scales, 1e-3)
      for k in one.history:
        np.testing.assert_allclose(np.asarray(one.history[k], np.float64),
                                   np.asarray(many.history[k], np.float64), rtol=1e-3, atol=1e-5)
      print(name, "ok")
    # LSUV shards its batch (GSPMD): the same kernels and statistics as on one device
    for cfg in ({"orthonormal": False}, {}):
      one = methods.initialize("lsuv", tm.conv_loss, params, batches[:1], cfg)
      many = methods.initialize("lsuv", tm.conv_loss, params, batches[:1], cfg, mesh=mesh)
      close(one.params, many.params, 1e-4)
      np.testing.assert_allclose(one.history["std_after"], many.history["std_after"], rtol=1e-4)
    print("lsuv ok")
    # kaiming / fixup ignore the mesh
    methods.initialize("kaiming", tm.conv_loss, params, None, mesh=mesh)
    try:
      methods.initialize("gradinit", tm.conv_loss, params, [tm.conv_batch(jax.random.PRNGKey(0), b=12)],
                         {"num_steps": 1, "batch_size": None}, mesh=mesh)
    except ValueError as e:
      assert "divisible" in str(e), e
    else:
      raise AssertionError("expected ValueError")

    # Data-parallel training (batch sharded, state replicated) == one device.
    import pathlib, tempfile
    model, variables, loader, test_set = make_setup(bn=True)
    cfg = tiny_config(num_epochs=1, eval_batch_size=40)
    with tempfile.TemporaryDirectory() as d:
      a = train.train(model, variables, loader, test_set, cfg, pathlib.Path(d) / "one")
      b = train.train(model, variables, loader, test_set, cfg, pathlib.Path(d) / "many", mesh=mesh)
      close(a.variables, b.variables, 1e-4)
      assert abs(a.final_test_acc - b.final_test_acc) <= 0.011, (a.final_test_acc, b.final_test_acc)
      # A mesh run stopped mid-run (step 4 of 6) resumes from its checkpoint to the same end.
      wd = pathlib.Path(d) / "stopped"
      part = train.train(model, variables, loader, test_set, cfg, wd, mesh=mesh, stop_after_step=4)
      assert not part.finished and part.step == 4, part.step
      c = train.train(model, variables, loader, test_set, cfg, wd, mesh=mesh)
      assert c.finished and c.step == b.step, (c.step, b.step)
      resumes = [r["step"] for r in train.read_metrics(wd / "metrics.jsonl") if r["type"] == "resume"]
      assert resumes == [4], resumes
      close(b.variables, c.variables, 1e-6)
    print("OK")
""")


@pytest.mark.slow  # 60-90 s on 2 cores: CI runs it (NIO_JAX_SLOW=1)
def test_data_parallel_gradinit_metainit_and_training_equal_single_device():
  stdout = run_on_8_devices(SCALE_OUT_SCRIPT)
  assert "OK" in stdout


def test_multihost_start_helpers():
  """The single-process side of the multi-process start (tests/test_multiprocess.py runs the
  real thing): no coordinator in the environment is a no-op, a half-set environment and an
  unreachable coordinator raise DistributedInitError naming the fix."""
  import socket
  import time

  import jax.numpy as jnp
  import numpy as np

  from nio_jax import distributed

  assert distributed.initialize_from_env({}) is False
  assert distributed.initialize_from_env({"NIO_JAX_NUM_PROCESSES": "1"}) is False
  with pytest.raises(distributed.DistributedInitError, match="NIO_JAX_PROCESS_ID"):
    distributed.initialize_from_env({"NIO_JAX_COORDINATOR": "localhost:1234"})
  with pytest.raises(distributed.DistributedInitError, match="HOST:PORT"):
    distributed.wait_for_coordinator("localhost", 1.0)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  t = time.monotonic()
  with pytest.raises(distributed.DistributedInitError, match=f"localhost:{port} did not answer"):
    distributed.wait_for_coordinator(f"localhost:{port}", 0.5, process_id=1)
  assert time.monotonic() - t < 10
  assert distributed.process_tag() == ""
  x = np.arange(4.0)
  np.testing.assert_array_equal(distributed.to_host({"a": jnp.asarray(x)})["a"], x)
