"""The README's Flax examples run, and the linen batch-norm contract holds."""

import pathlib
import runpy

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

import nio_jax
from nio_jax.flax_utils import linen_loss_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["linen_trainstate.py", "nnx_optimizer.py"])
def test_readme_example_runs(script, capsys):
  runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
  out = capsys.readouterr().out
  assert "GC per step" in out and "last training loss" in out
  # The README shows these files verbatim.
  assert (ROOT / "examples" / script).read_text().strip() in (ROOT / "README.md").read_text()


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(nn.tanh(x))


def test_linen_batchnorm_search_uses_batch_stats_and_leaves_running_stats():
  model = BNNet()
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (8, 4)) * 3 + 1
  y = jax.random.randint(key, (8,), 0, 3)
  variables = model.init(key, x, train=False)
  loss_fn = linen_loss_fn(model, batch_stats=variables["batch_stats"])
  # Training-mode batch statistics: differs from the eval-mode (running stats) loss.
  train_losses = loss_fn(variables["params"], {"image": x, "label": y})
  logits_eval = model.apply(variables, x, train=False)
  eval_losses = nio_jax.flax_utils.classification_losses(logits_eval, y)
  assert not np.allclose(train_losses, eval_losses)
  before = jax.tree_util.tree_map(np.array, variables["batch_stats"])
  res = nio_jax.nio(
    loss_fn,
    variables["params"],
    [{"image": x, "label": y}],
    {"num_steps": 3, "num_chunks": 2, "overlap": 0.0},
  )
  chex.assert_trees_all_equal(variables["batch_stats"], before)
  # BatchNorm affine leaves are rescaled but excluded from the GradCosine gradients.
  assert "BatchNorm_0" in res.scales
  assert not nio_jax.default_grad_filter(
    (jax.tree_util.DictKey("BatchNorm_0"), jax.tree_util.DictKey("scale"))
  )
  assert nio_jax.default_grad_filter(
    (jax.tree_util.DictKey("Dense_0"), jax.tree_util.DictKey("kernel"))
  )
