"""Saved params, checkpoints and scales load into a model of either block layout (scanned
`stageN_scan` or unrolled `stageN_blockK`): `models.match_layout` at every load point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nio_jax import models, scales
from nio_jax.config import ConfigError
from nio_jax.experiment import load_checkpoint_variables, load_variables, save_variables
from nio_jax.train.checkpoint import Checkpointer

X = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))


def build(scan, norm="bn", key=0):
  m = models.CifarResNet(depth=20, width=4, norm=norm, scan=scan)
  return m, m.init(jax.random.key(key), X)


def logits(model, variables):
  return model.apply(variables, X, train=False)


@pytest.mark.parametrize("saved_scan", [True, False])
def test_msgpack_params_load_into_the_other_layout(tmp_path, saved_scan):
  m_saved, v_saved = build(saved_scan)
  m_load, target = build(not saved_scan, key=1)
  path = save_variables(tmp_path / "p.msgpack", v_saved)
  v = load_variables(path, target)
  assert jax.tree.structure(v) == jax.tree.structure(target)
  np.testing.assert_allclose(logits(m_load, v), logits(m_saved, v_saved), rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits(m_load, target), logits(m_load, v))  # values were replaced


def test_checkpoint_loads_into_the_other_layout(tmp_path):
  m_scan, v_scan = build(True)
  m_unr, target = build(False, key=1)
  ck = Checkpointer(tmp_path / "ckpt", async_save=False)
  ck.save(3, {"params": v_scan["params"], "batch_stats": v_scan["batch_stats"]}, {"epoch": 1})
  ck.close()
  v = load_checkpoint_variables(tmp_path / "ckpt", "latest", target)
  np.testing.assert_allclose(logits(m_unr, v), logits(m_scan, v_scan), rtol=1e-5, atol=1e-6)


def test_scales_convert_between_layouts():
  _, v_scan = build(True, norm="none")
  _, v_unr = build(False, norm="none")
  v_unr = models.match_layout(v_scan, v_unr)  # same weights, unrolled
  s_scan, _ = scales.init_scales(v_scan["params"])
  s_scan = jax.tree_util.tree_map(
    lambda s: s * jnp.linspace(0.5, 1.5, s.size).reshape(s.shape), s_scan
  )
  s_unr_like, _ = scales.init_scales(v_unr["params"])
  s_unr = models.match_layout(s_scan, s_unr_like)
  assert jax.tree.structure(s_unr) == jax.tree.structure(s_unr_like)
  a = models.match_layout(scales.apply_scales(v_scan["params"], s_scan), v_unr["params"])
  b = scales.apply_scales(v_unr["params"], s_unr)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_match_layout_rejects_another_model(tmp_path):
  _, v = build(True)
  other = models.CifarResNet(depth=14, width=4, norm="bn", scan=False).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="either block layout"):
    models.match_layout(v, {"params": {"x": 1}})
  path = save_variables(tmp_path / "p.msgpack", v)
  with pytest.raises(ConfigError):
    load_variables(path, other)


def test_resume_in_the_other_layout_names_the_problem_and_keeps_the_checkpoint(tmp_path):
  """Resuming a run with another `scan` setting would need the optimizer state converted as
  well: the trainer refuses with an error that names the layouts, and the checkpoint stays."""
  from nio_jax import data, train  # noqa: PLC0415

  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
  ds = data.ArrayDataset(imgs, rng.integers(0, 10, 64), 10, (0.5,) * 3, (0.25,) * 3, "s", "train")
  loader = data.Loader(ds, 16, seed=0, transform=data.Transform(ds.mean, ds.std))
  cfg = train.default_config()
  cfg.update(num_epochs=1, batch_size=16, log_every=1, progress=False, plots=False)
  m_scan, v_scan = build(True, norm="none")
  first = train.train(m_scan, v_scan, loader, ds, cfg, tmp_path, stop_after_step=2)
  assert first.step == 2
  ck = Checkpointer(tmp_path / "checkpoints")
  steps = ck.all_steps()
  ck.close()
  m_unr, _ = build(False, norm="none")
  v_unr = models.match_layout(v_scan, m_unr.init(jax.random.key(0), X))
  with pytest.raises(ValueError, match="scanned block layout, and this model is unrolled"):
    train.train(m_unr, v_unr, loader, ds, cfg, tmp_path)
  ck = Checkpointer(tmp_path / "checkpoints")
  assert ck.all_steps() == steps and 2 in steps
  ck.close()
  # the checkpoint's params still load into the unrolled model for a new run
  v = load_checkpoint_variables(tmp_path / "checkpoints", "latest", v_unr)
  assert jax.tree.structure(v["params"]) == jax.tree.structure(v_unr["params"])
