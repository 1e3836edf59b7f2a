"""The search on the device (`device_loop=True`): all steps in one `lax.scan`. Its scales,
history and safety behaviour must equal the host loop's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nio_jax
from nio_jax import errors
from nio_jax.methods import gradinit, metainit
from tests import tiny_models as tm


def batches(n, b=8, seed=0):
  return [tm.mlp_batch(jax.random.key(seed + i), b=b) for i in range(n)]


def assert_same_result(host, dev):
  for a, b in zip(jax.tree_util.tree_leaves(host.scales), jax.tree_util.tree_leaves(dev.scales)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(host.params), jax.tree_util.tree_leaves(dev.params)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  assert sorted(host.history) == sorted(dev.history)
  for k in host.history:
    assert np.shape(host.history[k]) == np.shape(dev.history[k]), k
    np.testing.assert_allclose(
      np.asarray(dev.history[k], np.float64), np.asarray(host.history[k], np.float64), rtol=1e-5
    )


@pytest.mark.parametrize("num_chunks", [None, 2])
def test_nio_device_loop_equals_host_loop(num_chunks):
  params = tm.mlp_params(jax.random.key(0))
  cfg = dict(num_steps=5, num_chunks=num_chunks, overlap=0.0, lr=0.05)
  host = nio_jax.nio(tm.mlp_loss, params, batches(3), cfg)
  dev = nio_jax.nio(tm.mlp_loss, params, batches(3), {**cfg, "device_loop": True})
  assert host.num_steps == dev.num_steps == 5
  assert_same_result(host, dev)
  # the search moved the scales: equality is not trivially the initial ones
  assert any(np.any(np.asarray(s) != 1) for s in jax.tree_util.tree_leaves(dev.scales))


def test_gradinit_and_metainit_device_loop_equal_host_loop():
  params = tm.mlp_params(jax.random.key(1))
  cfg = dict(num_steps=3, batch_size=None)
  host = gradinit(tm.mlp_loss, params, batches(4, seed=5), cfg)
  dev = gradinit(tm.mlp_loss, params, batches(4, seed=5), {**cfg, "device_loop": True})
  assert_same_result(host, dev)
  host = metainit(tm.mlp_loss, params, batches(2, seed=7), dict(num_steps=3))
  dev = metainit(tm.mlp_loss, params, batches(2, seed=7), dict(num_steps=3, device_loop=True))
  assert_same_result(host, dev)


def test_device_loop_non_finite_reports_first_bad_step_and_last_good():
  params = tm.mlp_params(jax.random.key(0))
  data = [{**d, "bad": jnp.zeros(8, jnp.int32)} for d in batches(4)]
  data[2]["bad"] = data[2]["bad"].at[0].set(1)  # step 2 turns NaN

  def loss(p, batch):
    return tm.mlp_loss(p, batch) + jnp.where(batch["bad"] > 0, jnp.nan, 0.0)

  cfg = dict(num_steps=4, num_chunks=2, overlap=0.0, lr=0.05)
  caught = {}
  for device_loop in (False, True):
    with pytest.raises(errors.NonFiniteError) as e:
      nio_jax.nio(loss, params, data, {**cfg, "device_loop": device_loop})
    caught[device_loop] = e.value
  assert caught[True].step == caught[False].step == 2
  assert_same_result(caught[False].last_good, caught[True].last_good)
  assert caught[True].last_good.num_steps == 2


def test_device_loop_zero_gradient_raises_like_host_loop():
  params = tm.mlp_params(jax.random.key(0))
  data = batches(3)

  def loss(p, batch):  # example 1 of the second batch contributes nothing
    return tm.mlp_loss(p, batch) * batch["w"]

  data = [{**d, "w": jnp.ones(8)} for d in data]
  data[1]["w"] = data[1]["w"].at[1].set(0.0)
  cfg = dict(num_steps=3, num_chunks=None, overlap=0.0, lr=0.05)
  for device_loop in (False, True):
    with pytest.raises(errors.ZeroGradientError, match=r"step 1"):
      nio_jax.nio(loss, params, data, {**cfg, "device_loop": device_loop})


def test_device_loop_rejects_changing_batch_size():
  params = tm.mlp_params(jax.random.key(0))
  data = [tm.mlp_batch(jax.random.key(0), b=8), tm.mlp_batch(jax.random.key(1), b=6)]
  with pytest.raises(ValueError, match="batch size changed"):
    nio_jax.nio(
      tm.mlp_loss, params, data, dict(num_steps=2, device_loop=True, num_chunks=None, overlap=0.0)
    )
