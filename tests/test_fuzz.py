"""Fuzzing the public entry points with random small MLPs, batches and hyper-parameters
(including 0 / negative / inf / NaN, NaN inputs, integer params, odd batch sizes, too many
chunks): every call either returns finite results or raises one of the library's documented
errors (`ValueError` / `TypeError` and their subclasses `NonFiniteError`, `ZeroGradientError`,
`LossFnError`) from nio_jax's own checks - never an exception from deep inside JAX."""
import math
import pathlib
import traceback

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings

import nio_jax
from nio_jax import errors, methods
from tests import tiny_models as tm

PKG = str(pathlib.Path(nio_jax.__file__).parent)
ODD = [0.0, -1.0, math.inf, -math.inf, math.nan, 1e-3, 0.05, 10.0, 1e6]


def _raised_by_library(e: BaseException) -> bool:
  """The exception was raised by a nio_jax frame (its own check), not inside JAX/NumPy."""
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and frames[-1].filename.startswith(PKG)


def _assert_finite(tree):
  for x in jax.tree_util.tree_leaves(tree):
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.floating):
      assert np.all(np.isfinite(a)), "a result holds NaN/inf"


@st.composite
def cases(draw):
  """A valid call with at most one injected fault (so both the success path - finite results,
  or a NonFiniteError from a huge learning rate - and each check are exercised)."""
  fault = draw(st.sampled_from([None, None, None, "hyper", "overlap", "chunks", "batch",
                                "input", "int_params"]))
  sizes = draw(st.sampled_from([(3, 4, 2), (2, 3)]))
  b = draw(st.integers(1, 9)) if fault == "batch" else draw(st.sampled_from([4, 6, 8]))
  seed = draw(st.integers(0, 3))
  params = tm.mlp_params(jax.random.PRNGKey(seed), sizes)
  if fault == "int_params":
    params = jax.tree_util.tree_map(lambda x: (10 * x).astype(jnp.int32), params)
  batch = tm.mlp_batch(jax.random.PRNGKey(seed + 1), b=b, d=sizes[0], c=sizes[-1])
  if fault == "input":
    batch = dict(batch, x=batch["x"].at[0, 0].set(draw(st.sampled_from([math.nan, math.inf]))))
  if fault in ("chunks", "batch"):
    num_chunks = draw(st.one_of(st.none(), st.integers(1, 10)))
  else:
    num_chunks = draw(st.one_of(st.none(), st.integers(2, b)))
  if fault == "overlap":
    overlap = draw(st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)))
  else:
    overlap = 0.0 if num_chunks is None else draw(st.sampled_from([0.0, 0.2, 0.5]))
  ok = [1e-3, 0.05, 10.0, 1e6]
  gamma = draw(st.sampled_from(ODD if fault == "hyper" else ok))
  lr = draw(st.sampled_from(ODD if fault == "hyper" else ok))
  steps = draw(st.integers(1, 2))
  method = draw(st.sampled_from(["gradcosine", "measure", "nio", "gradinit", "gradinit_adam",
                                 "metainit", "per_example_grads"]))
  return method, params, batch, num_chunks, overlap, gamma, lr, steps


def _run(method, params, batch, num_chunks, overlap, gamma, lr, steps):
  loss = tm.mlp_loss
  if method == "gradcosine":
    return nio_jax.gradcosine(loss, params, batch, num_chunks=num_chunks, overlap=overlap)
  if method == "per_example_grads":
    return nio_jax.per_example_grads(loss, params, batch)
  if method == "measure":
    return nio_jax.measure(loss, params, [batch], num_batches=1, num_chunks=num_chunks,
                           overlap=overlap)
  if method == "nio":
    cfg = {"num_steps": steps, "num_chunks": num_chunks, "overlap": overlap, "gamma": gamma,
           "lr": lr}
  elif method.startswith("gradinit"):
    cfg = {"num_steps": steps, "gamma": gamma, "lr": lr, "batch_size": None,
           "lookahead": "half" if num_chunks is None else "thirds"}
  else:
    cfg = {"num_steps": steps, "lr": lr, "variant": "rescale_adam" if num_chunks else
           "sign_momentum"}
  return methods.initialize(method, loss, params, [batch], cfg)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(cases())
def test_fuzz_entry_points_return_finite_or_raise_documented_errors(case):
  try:
    out = _run(*case)
  except (ValueError, TypeError) as e:
    assert _raised_by_library(e), (
        f"{type(e).__name__} from inside a dependency, not a nio_jax check: {e}\n"
        + "".join(traceback.format_exception(e)[-6:]))
    if isinstance(e, errors.NonFiniteError) and e.last_good is not None:
      _assert_finite(e.last_good.params)
    return
  if isinstance(out, nio_jax.InitResult):
    _assert_finite((out.params, out.scales))
  elif isinstance(out, dict) and "gc" in out:  # measure
    assert all(np.isfinite(v) for v in out.values())
  else:
    _assert_finite(out)
