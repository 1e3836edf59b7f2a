"""The registry's scanned models in a user's own `jax.jit(jax.grad(loss))` loop (issue 20):
`scan_unroll` resolves per backend, changes only the compiled loop (never the layout or the
numbers), and `benchmarks/user_loop.py` times the forms on a tiny ResNet."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nio_jax import models
from nio_jax.models._common import CPU_UNROLL_MAX, resolve_unroll


def test_resolve_unroll_per_backend_and_bad_values():
  assert resolve_unroll(None, 17, "cpu") == 17  # ResNet-110's stage tails: unrolled on CPU
  assert resolve_unroll(None, CPU_UNROLL_MAX + 1, "cpu") == 1  # ResNet-1202: compile time
  # The bound itself is inclusive: exactly CPU_UNROLL_MAX blocks are unrolled on CPU.
  assert resolve_unroll(None, CPU_UNROLL_MAX, "cpu") == CPU_UNROLL_MAX
  assert resolve_unroll(None, 17, "gpu") == 1 and resolve_unroll(None, 17, "tpu") == 1
  assert resolve_unroll(True, 5) == 5 and resolve_unroll(3, 5) == 3 and resolve_unroll(9, 5) == 5
  for bad in (0, -1, 1.5, "all", False):
    with pytest.raises(ValueError, match="scan_unroll"):
      resolve_unroll(bad, 4)


def _loss(model):
  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": params}, x), y
    ).mean()

  return loss


def test_hand_written_grad_of_the_default_model_has_no_while_loop_on_cpu_and_same_numbers():
  """The user's loop as the README writes it, over `models.get` with no wrapper: on XLA:CPU
  the default compiles without a while loop (the slow path of issue 20) and gives the rolled
  scan's and the unrolled model's gradients."""
  if jax.default_backend() != "cpu":
    pytest.skip("the default unrolls on XLA:CPU only")
  kw = dict(depth=20, width=4, norm="none")  # 2 scanned blocks per stage (1 would fold)
  default = models.get("resnet20", **kw)
  rolled = models.get("resnet20", **kw, scan_unroll=1)
  unrolled = models.get("resnet20", **kw, scan=False)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  y = jnp.arange(4) % 10
  params = default.init(jax.random.key(0), x)["params"]
  texts, grads = {}, {}
  for name, model, p in (
    ("default", default, params),
    ("rolled", rolled, params),
    ("unrolled", unrolled, models.unstack_blocks({"params": params})["params"]),
  ):
    fn = jax.jit(jax.grad(_loss(model)))
    texts[name] = fn.lower(p, x, y).compile().as_text()
    grads[name] = fn(p, x, y)
  has_while = {k: bool(re.search(r"\bwhile\(", t)) for k, t in texts.items()}  # HLO while
  assert has_while == {"default": False, "rolled": True, "unrolled": False}
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
  jax.tree.map(chex_close, grads["default"], grads["rolled"])
  jax.tree.map(
    chex_close, models.unstack_blocks({"params": grads["default"]})["params"], grads["unrolled"]
  )


def test_user_loop_benchmark_times_every_form_on_a_tiny_resnet(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  from benchmarks import user_loop

  res = user_loop.row(8, 2, reps=1, budget_s=5.0, torch_on=True)  # ResNet-8: 1 block/stage
  assert set(res["forms"]) == {*user_loop.FORMS, "torch"}
  for form in user_loop.FORMS:
    e = res["forms"][form]
    assert e["step_ms"] > 0 and e["compile_s"] >= 0 and e["vs_torch"] > 0
  assert res["forms"]["rolled"]["while_loop"] is False  # ResNet-8 scans nothing
  monkeypatch.setattr("sys.argv", ["user_loop"])
  assert (
    user_loop.main(["--depths", "8", "--batch", "2", "--reps", "1", "--out", str(tmp_path)]) == 0
  )
  out = (tmp_path / f"user_loop_{jax.default_backend()}.md").read_text()
  assert "| resnet8 | default |" in out and "other processes' CPU share" in out


def test_user_loop_depth_table_for_one_form(tmp_path, monkeypatch):
  """`--forms default --tag`: only that form, the faults per step, and the depth table (each
  step as a multiple of the first depth's, beside the multiple of blocks)."""
  pytest.importorskip("torch")
  from benchmarks import user_loop

  monkeypatch.setattr("sys.argv", ["user_loop"])
  argv = ["--depths", "8,14", "--batch", "2", "--reps", "1", "--forms", "default"]
  assert user_loop.main([*argv, "--tag", "_d", "--out", str(tmp_path)]) == 0
  res = json.loads((tmp_path / f"user_loop_{jax.default_backend()}_d.json").read_text())
  assert [set(r["forms"]) for r in res["rows"]] == [{"default", "torch"}] * 2
  assert all(r["forms"]["default"]["faults_per_step"] >= 0 for r in res["rows"])
  md = (tmp_path / f"user_loop_{jax.default_backend()}_d.md").read_text()
  assert "| resnet14 | 6 | 2.00 |" in md  # 6 blocks against ResNet-8's 3
  with pytest.raises(SystemExit):
    user_loop.main(["--forms", "fast"])


@pytest.mark.parametrize("conv", ["im2col", "slices"])
def test_user_step_with_convs_as_matmuls_equals_the_plain_step(conv):
  """The opt-in `im2col` / `slices` forms of the benchmark are the same training step."""
  from benchmarks import user_loop

  spec = user_loop.build_spec(8, 2)
  params = spec["variables"]["params"]
  x, y = jnp.asarray(spec["x"][:2]), jnp.asarray(spec["y"][:2])
  tx = optax.sgd(0.1, momentum=0.9)
  args = (params, tx.init(params), x, y)
  want = jax.jit(user_loop.user_step(spec["model"], tx))(*args)
  got = jax.jit(user_loop.user_step(spec["model"], tx, conv))(*args)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
  jax.tree.map(close, got, want)
