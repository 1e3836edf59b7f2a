"""benchmarks.profile_step: HLO instructions are matched to the profiler's thunk events."""

import jax
import jax.numpy as jnp

from benchmarks import profile_step as ps


def _conv_grad(w, x):
  def loss(w):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.tanh(y) ** 2)

  return jax.grad(loss)(w)


def test_hlo_index_classifies_forward_and_backward_convolutions_and_fusions():
  w, x = jnp.ones((3, 3, 4, 8)), jnp.ones((2, 8, 8, 4))
  text = jax.jit(_conv_grad).lower(w, x).compile().as_text()
  instrs = ps.hlo_index(text)
  kinds = {ps.kind_of(v) for v in instrs.values()}
  assert "convolution (forward)" in kinds
  assert "convolution (backward)" in kinds
  convs = [v for v in instrs.values() if v["opcode"] == "convolution"]
  assert len(convs) == 2  # the forward and the kernel-gradient convolution
  assert all(v["calls"] is None for v in convs)
  fusions = [v for v in instrs.values() if v["opcode"] == "fusion"]
  assert fusions and all(v["inner"] for v in fusions)  # each fusion's body was found
  assert ps.kind_of({"opcode": "while", "op_name": "", "calls": None, "inner": []}) is None


def test_profile_jax_sums_the_thunks_of_every_step():
  w, x = jnp.ones((3, 3, 4, 8)), jnp.ones((2, 8, 8, 4))
  res = ps.profile_jax(jax.jit(_conv_grad), (w, x), reps=3)
  kinds = {k["kind"]: k for k in res["kinds"]}
  assert {"convolution (forward)", "convolution (backward)"} <= set(kinds)
  # every convolution's events were matched to its HLO instruction, none left over
  assert not [e for e in res["other_events"] if e["name"].startswith(("conv", "fusion"))]
  assert res["total_ms"] > 0 and res["wall_ms"] > 0
  assert abs(sum(k["share"] for k in res["kinds"]) - 1.0) < 1e-3
  assert res["top"][0]["ms"] >= res["top"][-1]["ms"]


def test_summarise_skips_containers_and_end_markers():
  instrs = {
    "conv.1": {"opcode": "convolution", "op_name": "jit(f)/conv", "calls": None, "inner": []},
    "while.2": {"opcode": "while", "op_name": "", "calls": None, "inner": []},
  }
  events = [
    {"name": "conv.1", "dur": 2000.0},
    {"name": "end: conv.1", "dur": 5.0},
    {"name": "while.2", "dur": 9000.0},
    {"name": "PjitFunction(f)", "dur": 9500.0},
  ]
  res = ps.summarise(events, instrs, reps=2)
  assert res["total_ms"] == 1.0  # 2 ms over 2 steps; the while and host events are not summed
  assert [k["kind"] for k in res["kinds"]] == ["convolution (forward)"]


def test_committed_profiles_are_rendered_from_their_json():
  """Each committed profile_*.md holds only what `markdown` renders from its JSON."""
  import json
  import pathlib

  results = pathlib.Path(ps.__file__).parent / "results"
  paths = sorted(results.glob("profile_*.json"))
  assert paths, "no committed profile"
  for path in paths:
    res = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text() == ps.markdown(res), path.name
    assert res["parts"] and all(p["jax"]["kinds"] for p in res["parts"].values())
