"""Fixup: the model variant and the `nio_jax.methods.fixup` rules."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nio_jax import models
from nio_jax.methods.fixup import (
  FixupConfig,
  fixup,
  fixup_multiplier,
  fixup_rules,
  infer_structure,
)

DEPTH, WIDTH = 14, 4  # n = 2 blocks per stage, L = 6 branches


@functools.cache
def _init(fixup_rescale: bool = True):
  """Cached across tests: each jitted init costs a compile."""
  model = models.get(
    "resnet20", depth=DEPTH, width=WIDTH, variant="fixup", fixup_rescale=fixup_rescale
  )
  v = jax.jit(model.init)(jax.random.key(3, impl="rbg"), jnp.zeros((1, 8, 8, 3)))
  return model, v["params"]


def test_output_at_init_is_stem_through_identity():
  model, params = _init()
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
  logits = model.apply({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(logits), 0.0)  # zero classifier
  feats = model.apply({"params": params}, x, return_features=True)
  # expected: relu(stem conv), subsampled twice by the option-A shortcuts, zero channels padded
  k = params["conv1"]["kernel"]
  stem = jax.nn.relu(
    jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  pooled = jnp.mean(stem[:, ::4, ::4, :], axis=(1, 2))
  expected = jnp.concatenate([pooled, jnp.zeros((2, 4 * WIDTH - WIDTH))], axis=-1)
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
  # branches are zero at init: last conv of every branch is 0, multipliers 1, biases 0
  for key, blk in params.items():
    if "_block" in key or key.endswith("_scan"):
      assert float(jnp.max(jnp.abs(blk["conv2"]["kernel"]))) == 0.0
      np.testing.assert_array_equal(blk["scale"], 1.0)
      for b in ("bias1a", "bias1b", "bias2a", "bias2b"):
        np.testing.assert_array_equal(blk[b], 0.0)


@pytest.mark.parametrize(
  "L,m,expected", [(6, 2, 6**-0.5), (54, 2, 54**-0.5), (16, 3, 16**-0.25), (3, 4, 3 ** (-1 / 6))]
)
def test_multiplier(L, m, expected):
  assert fixup_multiplier(L, m) == pytest.approx(expected)
  assert models.fixup_multiplier(L, m) == pytest.approx(expected)
  with pytest.raises(ValueError):
    fixup_multiplier(L, 1)


def test_rules_turn_he_init_into_fixup_init_m2():
  _, plain = _init(fixup_rescale=False)  # GradInit release init: all convs He fan_out
  _, fixup = _init()  # Fixup init built into the model
  assert infer_structure(plain) == (3 * (DEPTH - 2) // 6, 2)
  new = fixup_rules(plain)
  chex.assert_trees_all_close(new, fixup, rtol=1e-6, atol=1e-7)
  # explicit form, exponent for m = 2: first branch conv scaled by L^-1/2 exactly
  new2 = fixup_rules(plain, num_branches=6, layers_per_branch=2)
  ratio = new2["stage2_scan"]["conv1"]["kernel"] / plain["stage2_scan"]["conv1"]["kernel"]
  np.testing.assert_allclose(ratio, 6**-0.5, rtol=1e-6)
  # the stem conv is untouched, the classifier zeroed
  chex.assert_trees_all_equal(new2["conv1"], plain["conv1"])
  np.testing.assert_array_equal(new2["fc"]["kernel"], 0.0)
  # already-Fixup params are not rescaled twice
  chex.assert_trees_all_equal(fixup_rules(fixup), fixup)


def _bottleneck_tree(rng, n_scanned=3):
  def conv(shape):
    return {"kernel": jnp.asarray(rng.randn(*shape), jnp.float32)}

  def block(lead=()):
    return {
      "conv1": conv(lead + (1, 1, 8, 4)),
      "conv2": conv(lead + (3, 3, 4, 4)),
      "conv3": conv(lead + (1, 1, 4, 8)),
      "bias1a": jnp.ones(lead + (1,)),
      "scale": jnp.full(lead + (1,), 3.0),
      "bn1": {"scale": jnp.full(lead + (4,), 2.0)},
    }

  tree = {
    "conv1": conv((7, 7, 3, 8)),
    "bias1": jnp.ones((1,)),
    "layer1_block0": {**block(), "downsample_conv": conv((1, 1, 8, 8))},
    "layer1_scan": block((n_scanned,)),
    "fc": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones((10,))},
  }
  return tree


def test_rules_m3_bottleneck():
  tree = _bottleneck_tree(np.random.RandomState(0))
  L, m = infer_structure(tree)
  assert (L, m) == (4, 3)
  new = fixup_rules(tree)
  f = 4**-0.25
  for blk in ("layer1_block0", "layer1_scan"):
    np.testing.assert_allclose(
      new[blk]["conv1"]["kernel"], tree[blk]["conv1"]["kernel"] * f, rtol=1e-6
    )
    np.testing.assert_allclose(
      new[blk]["conv2"]["kernel"], tree[blk]["conv2"]["kernel"] * f, rtol=1e-6
    )
    np.testing.assert_array_equal(new[blk]["conv3"]["kernel"], 0.0)
    np.testing.assert_array_equal(new[blk]["bias1a"], 0.0)
    np.testing.assert_array_equal(new[blk]["scale"], 1.0)
    np.testing.assert_array_equal(new[blk]["bn1"]["scale"], 2.0)  # BN untouched
  chex.assert_trees_all_equal(
    new["layer1_block0"]["downsample_conv"], tree["layer1_block0"]["downsample_conv"]
  )
  np.testing.assert_array_equal(new["bias1"], 0.0)
  np.testing.assert_array_equal(new["fc"]["kernel"], 0.0)
  np.testing.assert_array_equal(new["fc"]["bias"], 0.0)
  # explicit L overrides the inferred one
  new8 = fixup_rules(tree, num_branches=16, layers_per_branch=3)
  np.testing.assert_allclose(
    new8["layer1_scan"]["conv1"]["kernel"], tree["layer1_scan"]["conv1"]["kernel"] * 0.5, rtol=1e-6
  )


def test_method_and_config():
  _, plain = _init(fixup_rescale=False)
  _, fixed = _init()
  res = fixup(None, plain, None, None)
  assert res.method == "fixup" and res.scales is None and res.history == {}
  assert res.config == {"num_branches": 6, "layers_per_branch": 2, "force": False}
  chex.assert_trees_all_close(res.params, fixed, rtol=1e-6, atol=1e-7)
  # the config class, a dict and keyword overrides are the same config
  assert FixupConfig.create({"num_branches": 6}) == FixupConfig.create(num_branches=6)
  assert FixupConfig.create(FixupConfig(layers_per_branch=2)).to_dict() == {
    "num_branches": None,
    "layers_per_branch": 2,
    "force": False,
  }
  with pytest.raises(ValueError, match="unknown Fixup config"):
    fixup(None, plain, None, {"lr": 1.0})
  with pytest.raises(ValueError, match="layers_per_branch=1 must be >= 2"):
    FixupConfig.create(layers_per_branch=1)
  with pytest.raises(TypeError, match="force must be a bool"):
    FixupConfig.create(force=1)
  with pytest.raises(TypeError, match="config must be None, FixupConfig"):
    fixup(None, plain, None, 5)
  with pytest.raises(ValueError, match="no residual branches"):
    fixup_rules({"fc": {"kernel": jnp.ones((2, 2))}})


def test_methods_registry_entry():
  methods = pytest.importorskip("nio_jax.methods")
  tree = _bottleneck_tree(np.random.RandomState(1))
  res = methods.initialize("fixup", None, tree, None, {"layers_per_branch": 3})
  assert res.method == "fixup" and res.config == {
    "layers_per_branch": 3,
    "num_branches": 4,
    "force": False,
  }
  np.testing.assert_array_equal(res.params["layer1_scan"]["conv3"]["kernel"], 0.0)
