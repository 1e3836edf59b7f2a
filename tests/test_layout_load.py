"""Saved params, checkpoints and scales load into a model of either block layout (scanned
`stageN_scan` or unrolled `stageN_blockK`): `models.match_layout` at every load point."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nio_jax import models, scales
from nio_jax.errors import ConfigError
from nio_jax.files import (
  checkpoint_steps,
  load_checkpoint_variables,
  load_variables,
  save_variables,
)
from nio_jax.train.checkpoint import Checkpointer

X = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))


@functools.cache  # the arrays are immutable: the tests share the eager inits
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


def _resume_setup():
  from nio_jax import data, train  # noqa: PLC0415

  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
  ds = data.ArrayDataset(imgs, rng.integers(0, 10, 64), 10, (0.5,) * 3, (0.25,) * 3, "s", "train")
  loader = data.Loader(ds, 16, seed=0, transform=data.Transform(ds.mean, ds.std))
  cfg = train.default_config()
  cfg.update(num_epochs=1, batch_size=16, log_every=1, progress=False, plots=False)
  return loader, ds, cfg


def _saved_layout(ckpt_dir, step):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  meta = ocp.StandardCheckpointHandler().metadata(ckpt_dir / str(step) / "state")
  return models.block_layout(meta["params"])


@pytest.mark.parametrize(
  "first_scan",
  [True, pytest.param(False, marks=pytest.mark.slow)],
  ids=["scanned_to_unrolled", "unrolled_to_scanned"],
)
def test_resume_in_the_other_layout_continues_exactly(tmp_path, first_scan):
  """A BN run with momentum stopped after 2 steps and resumed with the other `scan` setting
  (params, batch_stats and the momentum trace converted) ends where the same run trained in
  one layout ends; the checkpoint it resumed from stays as it was."""
  from nio_jax import train  # noqa: PLC0415

  loader, ds, cfg = _resume_setup()
  m_first, v_first = build(first_scan)
  m_then, v_then = build(not first_scan, key=1)  # its values are unused: the run resumes
  ref = train.train(m_first, v_first, loader, ds, cfg, tmp_path / "ref")
  wd = tmp_path / "run"
  part = train.train(m_first, v_first, loader, ds, cfg, wd, stop_after_step=2)
  assert part.step == 2 and not part.finished
  saved = "scanned" if first_scan else "unrolled"
  assert _saved_layout(wd / "checkpoints", 2) == saved
  res = train.train(m_then, v_then, loader, ds, cfg, wd)
  assert res.finished and res.step == ref.step == 4
  recs = train.read_metrics(wd / "metrics.jsonl")
  assert any(r["type"] == "resume" and r["step"] == 2 for r in recs)
  assert jax.tree.structure(res.variables) == jax.tree.structure(v_then)
  want = models.match_layout(ref.variables, res.variables)
  for x, y in zip(jax.tree.leaves(res.variables), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert 2 in checkpoint_steps(wd / "checkpoints")
  assert _saved_layout(wd / "checkpoints", 2) == saved


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _unrolled_paths(flat_scanned):
  """The leaves of a scanned tree under their unrolled paths: `[..._scan][...]` leaf `x`
  becomes `[..._block{i + 1}][...]` leaf `x[i]`."""
  out = {}
  for path, x in flat_scanned.items():
    m = re.search(r"\['(\w+)_scan'\]", path)
    if m is None:
      out[path] = x
    else:
      for i in range(x.shape[0]):
        out[path.replace(m.group(0), f"['{m.group(1)}_block{i + 1}']")] = x[i]
  return out


@pytest.mark.parametrize("no_norm", [False, True], ids=["bn_recipe", "param_groups"])
def test_optimizer_state_converts_between_layouts(tmp_path, no_norm):
  """Every leaf of a saved state (params, batch_stats, each group's momentum trace, step
  counters) lands at its place in the other layout, masked parameter groups included (the
  no-norm recipe: a slow lr group and clipping), and converts back bit for bit."""
  from nio_jax import train  # noqa: PLC0415

  cfg = train.default_config()
  tx, _ = train.make_optimizer(cfg, None, 4, no_norm=no_norm)
  _, v_scan = build(True)
  _, v_unr = build(False, key=1)

  def state(v, fill=False):
    opt = tx.init(v["params"])
    if fill:  # distinct values in every leaf of the optimizer state
      leaves, treedef = jax.tree.flatten(opt)
      rng = np.random.default_rng(0)
      opt = treedef.unflatten(
        [x + 3 if x.dtype.kind == "i" else rng.normal(size=x.shape).astype(x.dtype) for x in leaves]
      )
    step = jnp.full((), 7 if fill else 0, jnp.int32)
    return {"step": step, "params": v["params"], "batch_stats": v["batch_stats"], "opt_state": opt}

  saved = state(v_scan, fill=True)
  ck = Checkpointer(tmp_path / "scanned", async_save=False)
  ck.save(7, saved, {})
  unrolled, _ = ck.restore(7, state(v_unr))
  ck.close()
  assert jax.tree.structure(unrolled) == jax.tree.structure(state(v_unr))
  got, want = _flat(unrolled), _unrolled_paths(_flat(saved))
  assert sorted(got) == sorted(want)
  assert any("trace" in k and "_block2'" in k for k in got)
  assert any("['slow']" in k and "trace" in k for k in got) == no_norm  # partly masked groups
  for k, x in got.items():
    np.testing.assert_array_equal(x, want[k], err_msg=k)
  ck = Checkpointer(tmp_path / "unrolled", async_save=False)
  ck.save(7, unrolled, {})
  back, _ = ck.restore(7, state(v_scan))
  ck.close()
  assert jax.tree.structure(back) == jax.tree.structure(saved)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(x, y)


def test_resume_into_another_model_names_the_problem_and_keeps_the_checkpoint(tmp_path):
  """A checkpoint in the other layout that does not convert to the model (another depth)
  raises an error naming the layouts; the checkpoint stays."""
  _, v = build(True)
  ck = Checkpointer(tmp_path / "ckpt", async_save=False)
  ck.save(3, {"params": v["params"], "batch_stats": v["batch_stats"]}, {"epoch": 1})
  other = models.CifarResNet(depth=14, width=4, norm="bn", scan=False).init(jax.random.key(0), X)
  target = {"params": other["params"], "batch_stats": other["batch_stats"]}
  with pytest.raises(ValueError, match="scanned block layout, and this model is unrolled"):
    ck.restore(None, target)
  assert checkpoint_steps(tmp_path / "ckpt") == [3]
  state, _ = ck.restore(3, {"params": v["params"], "batch_stats": v["batch_stats"]})
  ck.close()
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(v)):
    np.testing.assert_array_equal(x, y)
