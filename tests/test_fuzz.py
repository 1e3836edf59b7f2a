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
  fault = draw(
    st.sampled_from(
      [None, None, None, "hyper", "overlap", "chunks", "batch", "input", "int_params"]
    )
  )
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
  # Valid draws use moderate values (a huge lr may legitimately end in NonFiniteError,
  # which belongs to the "hyper" draws).
  ok = [1e-3, 0.05, 10.0]
  gamma = draw(st.sampled_from(ODD if fault == "hyper" else ok))
  lr = draw(st.sampled_from(ODD if fault == "hyper" else [1e-3, 0.05]))
  steps = draw(st.integers(1, 2))
  method = draw(
    st.sampled_from(
      ["gradcosine", "measure", "nio", "gradinit", "gradinit_adam", "metainit", "per_example_grads"]
    )
  )
  return fault, (method, params, batch, num_chunks, overlap, gamma, lr, steps)


def _run(method, params, batch, num_chunks, overlap, gamma, lr, steps):
  loss = tm.mlp_loss
  if method == "gradcosine":
    return nio_jax.gradcosine(loss, params, batch, num_chunks=num_chunks, overlap=overlap)
  if method == "per_example_grads":
    return nio_jax.per_example_grads(loss, params, batch)
  if method == "measure":
    return nio_jax.measure(
      loss, params, [batch], num_batches=1, num_chunks=num_chunks, overlap=overlap
    )
  if method == "nio":
    cfg = {
      "num_steps": steps,
      "num_chunks": num_chunks,
      "overlap": overlap,
      "gamma": gamma,
      "lr": lr,
    }
  elif method.startswith("gradinit"):
    cfg = {
      "num_steps": steps,
      "gamma": gamma,
      "lr": lr,
      "batch_size": None,
      "lookahead": "half" if num_chunks is None else "thirds",
    }
  else:
    cfg = {
      "num_steps": steps,
      "lr": lr,
      "variant": "rescale_adam" if num_chunks else "sign_momentum",
    }
  return methods.initialize(method, loss, params, [batch], cfg)


# Faults that make every entry point's input invalid: the call must raise.
ALWAYS_INVALID = ("input", "int_params")


@settings(
  max_examples=60,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=list(HealthCheck),
)
@given(cases())
def test_fuzz_entry_points_return_finite_or_raise_documented_errors(drawn):
  """Valid draws (no fault) must succeed with finite results; draws with a fault either
  raise a documented error from a nio_jax check or (when the drawn value happens to be
  acceptable, e.g. overlap 0.2) succeed; NaN inputs and integer params must raise."""
  fault, case = drawn
  batch_size = case[2]["y"].shape[0]
  try:
    out = _run(*case)
  except (ValueError, TypeError) as e:
    assert fault is not None, (
      f"valid input ({case[0]}, B={batch_size}, num_chunks={case[3]}) raised "
      f"{type(e).__name__}: {e}"
    )
    assert _raised_by_library(e), (
      f"{type(e).__name__} from inside a dependency, not a nio_jax check: {e}\n"
      + "".join(traceback.format_exception(e)[-6:])
    )
    if isinstance(e, errors.NonFiniteError) and e.last_good is not None:
      _assert_finite(e.last_good.params)
    return
  assert fault not in ALWAYS_INVALID, f"{case[0]} accepted fault {fault!r}"
  assert fault != "batch" or batch_size >= 2, f"{case[0]} accepted a batch of {batch_size}"
  if isinstance(out, nio_jax.InitResult):
    _assert_finite((out.params, out.scales))
  elif isinstance(out, dict) and "gc" in out:  # measure
    assert all(np.isfinite(v) for v in out.values())
  else:
    _assert_finite(out)


# ----------------------------------------------------------------------------- bad-input table
# Every row of the table in docs/reliability.md comes from one of these calls: the test checks
# that each raises a documented error whose exact text is in the doc, and
# `python -m tests.test_fuzz` regenerates the table from the actual messages.


def _bad_input_cases():
  from nio_jax import data, models, train
  from tests.test_train import make_setup, tiny_config

  key = jax.random.PRNGKey(0)
  P = tm.mlp_params(key)
  B = tm.mlp_batch(key, b=8)
  L = tm.mlp_loss
  Pint = jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), P)
  nan_b = dict(B, x=B["x"].at[0, 0].set(jnp.nan))
  mean_loss = lambda p, b: jnp.mean(L(p, b))  # noqa: E731
  zeros = jax.tree_util.tree_map(jnp.zeros_like, P)
  s0, _ = nio_jax.init_scales(P)
  ds = lambda imgs, labels: data.ArrayDataset(imgs, labels, 10, (0.0,), (1.0,), "x", "train")  # noqa
  model, variables, loader, test_set = make_setup(bn=False)
  tr = lambda **kw: train.train(
    **{
      **dict(
        model=model,
        variables=variables,  # noqa: E731
        train_loader=loader,
        test_data=test_set,
        config=tiny_config(),
        workdir="/tmp/_nio_never",
      ),
      **kw,
    }
  )

  def bad_cfg(**kw):
    c = tiny_config()
    c.update(kw)
    return c

  tcheck = train.validate_train_config

  return [
    ("gradcosine", "batch of 1 example", lambda: nio_jax.gradcosine(L, P, tm.mlp_batch(key, b=1))),
    ("gradcosine", "num_chunks > batch size", lambda: nio_jax.gradcosine(L, P, B, num_chunks=9)),
    ("gradcosine", "num_chunks=1", lambda: nio_jax.gradcosine(L, P, B, num_chunks=1)),
    ("gradcosine", "num_chunks not an int", lambda: nio_jax.gradcosine(L, P, B, num_chunks="2")),
    (
      "gradcosine",
      "overlap outside [0, 1)",
      lambda: nio_jax.gradcosine(L, P, B, num_chunks=2, overlap=1.5),
    ),
    (
      "gradcosine",
      "overlap NaN",
      lambda: nio_jax.gradcosine(L, P, B, num_chunks=2, overlap=float("nan")),
    ),
    ("gradcosine", "overlap without num_chunks", lambda: nio_jax.gradcosine(L, P, B, overlap=0.2)),
    ("gradcosine", "NaN in a float input", lambda: nio_jax.gradcosine(L, P, nan_b)),
    (
      "gradcosine",
      "batch leaves of different lengths",
      lambda: nio_jax.gradcosine(L, P, {"x": B["x"], "y": B["y"][:5]}),
    ),
    ("gradcosine", "scalar batch leaf", lambda: nio_jax.gradcosine(L, P, {"x": 1.0})),
    ("gradcosine", "loss_fn returns the batch mean", lambda: nio_jax.gradcosine(mean_loss, P, B)),
    (
      "gradcosine",
      "loss_fn fails on the batch (wrong input width)",
      lambda: nio_jax.gradcosine(L, P, dict(B, x=jnp.ones((8, 6)))),
    ),
    ("gradcosine", "loss_fn not callable", lambda: nio_jax.gradcosine(3, P, B)),
    ("gradcosine", "integer params", lambda: nio_jax.gradcosine(L, Pint, B)),
    ("gradcosine", "unknown pullback", lambda: nio_jax.gradcosine(L, P, B, pullback="magic")),
    ("gradcosine", "unknown conv", lambda: nio_jax.gradcosine(L, P, B, conv="magic")),
    (
      "gradcosine",
      "pullback of the other setting",
      lambda: nio_jax.gradcosine(L, P, B, pullback="segments"),
    ),
    (
      "gradcosine",
      "an example with zero gradient",
      lambda: nio_jax.gradcosine(
        lambda p, b: L(p, b) * b["m"], P, dict(B, m=(jnp.arange(8) > 0).astype(jnp.float32))
      ),
    ),
    (
      "per_example_grads",
      "loss_fn returns the batch mean",
      lambda: nio_jax.per_example_grads(mean_loss, P, B),
    ),
    ("per_example_grads", "integer params", lambda: nio_jax.per_example_grads(L, Pint, B)),
    ("init_scales", "params with no scalable leaf (all zero)", lambda: nio_jax.init_scales(zeros)),
    ("init_scales", "params=None", lambda: nio_jax.init_scales(None)),
    ("init_scales", "negative min_scale", lambda: nio_jax.init_scales(P, min_scale=-1.0)),
    (
      "apply_scales",
      "scales tree differs from params",
      lambda: nio_jax.apply_scales(P, {"dense0": s0["dense0"]}),
    ),
    (
      "apply_scales",
      "integer scales",
      lambda: nio_jax.apply_scales(
        P, jax.tree_util.tree_map(lambda s: jnp.ones((), jnp.int32), s0)
      ),
    ),
    (
      "apply_scales",
      "NaN scales",
      lambda: nio_jax.apply_scales(P, jax.tree_util.tree_map(lambda s: jnp.full((), jnp.nan), s0)),
    ),
    (
      "apply_scales",
      "stacked scale of the wrong length",
      lambda: nio_jax.apply_scales({"a": jnp.ones((3, 2))}, {"a": jnp.ones(2)}),
    ),
    (
      "nio",
      "a single batch instead of an iterable",
      lambda: nio_jax.nio(L, P, B, {"num_steps": 1}),
    ),
    ("nio", "batches=None", lambda: nio_jax.nio(L, P, None, {"num_steps": 1})),
    ("nio", "empty list of batches", lambda: nio_jax.nio(L, P, [], {"num_steps": 1})),
    (
      "nio",
      "iterator shorter than num_steps",
      lambda: nio_jax.nio(L, P, iter([B, B]), {"num_steps": 3}),
    ),
    (
      "nio",
      "batch size changes",
      lambda: nio_jax.nio(
        L, P, [B, tm.mlp_batch(key, b=6)], {"num_steps": 2, "num_chunks": 2, "overlap": 0.0}
      ),
    ),
    (
      "nio",
      "params tree not the model's",
      lambda: nio_jax.nio(L, [1.0, 2.0], [B], {"num_steps": 1}),
    ),
    ("nio", "unknown config key", lambda: nio_jax.nio(L, P, [B], {"typo": 1})),
    ("nio", "gamma=0", lambda: nio_jax.nio(L, P, [B], {"gamma": 0.0})),
    ("nio", "lr=inf", lambda: nio_jax.nio(L, P, [B], {"lr": float("inf")})),
    ("nio", "lr=NaN", lambda: nio_jax.nio(L, P, [B], {"lr": float("nan")})),
    ("nio", "num_steps=0", lambda: nio_jax.nio(L, P, [B], {"num_steps": 0})),
    ("nio", "num_steps float", lambda: nio_jax.nio(L, P, [B], {"num_steps": 2.0})),
    ("nio", "unknown objective", lambda: nio_jax.nio(L, P, [B], {"objective": "gv"})),
    ("nio", "Adam beta >= 1", lambda: nio_jax.nio(L, P, [B], {"b2": 1.0})),
    (
      "nio",
      "chunk_size=0",
      lambda: nio_jax.nio(L, P, [B], {"num_chunks": None, "overlap": 0.0, "chunk_size": 0}),
    ),
    ("nio", "grad_filter not callable", lambda: nio_jax.nio(L, P, [B], {"grad_filter": 3})),
    (
      "nio",
      "grad_filter rejects every leaf",
      lambda: nio_jax.nio(L, P, [B], {"num_steps": 1, "grad_filter": lambda p, x: False}),
    ),
    ("nio", "config of the wrong type", lambda: nio_jax.nio(L, P, [B], 5)),
    (
      "nio",
      "mesh of the wrong type",
      lambda: nio_jax.nio(
        L,
        P,
        [tm.mlp_batch(key, b=3)],
        {"num_steps": 1, "num_chunks": None, "overlap": 0.0},
        mesh="not a mesh",
      ),
    ),
    (
      "nio",
      "loss becomes NaN at step 2",
      lambda: nio_jax.nio(
        lambda p, b: L(p, b) * jnp.sqrt(b["m"].astype(jnp.float32)),
        P,
        [dict(B, m=jnp.ones(8, jnp.int32))] * 2 + [dict(B, m=-jnp.ones(8, jnp.int32))],
        {"num_steps": 3, "lr": 0.05},
      ),
    ),
    ("measure", "num_batches=0", lambda: nio_jax.measure(L, P, [B], num_batches=0)),
    (
      "measure",
      "chunk_size not an int",
      lambda: nio_jax.measure(L, P, [B], num_batches=1, chunk_size=1.5),
    ),
    ("initialize", "unknown method", lambda: methods.initialize("foo", L, P, [B])),
    (
      "gradinit",
      "odd batch size (look-ahead halves)",
      lambda: methods.initialize(
        "gradinit", L, P, [tm.mlp_batch(key, b=7)], {"num_steps": 1, "batch_size": None}
      ),
    ),
    (
      "gradinit",
      "batch of 2 with lookahead='thirds'",
      lambda: methods.initialize(
        "gradinit",
        L,
        P,
        [tm.mlp_batch(key, b=2)],
        {"num_steps": 1, "batch_size": None, "lookahead": "thirds"},
      ),
    ),
    ("gradinit", "unknown recipe", lambda: methods.initialize("gradinit", L, P, [B], "resnet9000")),
    (
      "gradinit",
      "eta not a number",
      lambda: methods.initialize("gradinit", L, P, [B], {"eta": "x"}),
    ),
    (
      "gradinit",
      "layernorm_max_scale below min_scale",
      lambda: methods.initialize("gradinit", L, P, [B], {"layernorm_max_scale": 0.001}),
    ),
    (
      "gradinit",
      "loss_fn fails on the batch (missing key)",
      lambda: methods.initialize(
        "gradinit", L, {"a": P["dense0"]}, [B], {"num_steps": 1, "batch_size": None}
      ),
    ),
    (
      "gradinit_adam",
      "SGD variant requested",
      lambda: methods.initialize("gradinit_adam", L, P, [B], {"variant": "sgd"}),
    ),
    (
      "metainit",
      "shape spec with batch size 1",
      lambda: methods.initialize(
        "metainit", L, P, {"x": (1, 5), "num_classes": 3}, {"num_steps": 1}
      ),
    ),
    (
      "metainit",
      "shape spec whose keys loss_fn does not read",
      lambda: methods.initialize(
        "metainit", L, P, {"image": (4, 5), "num_classes": 3}, {"num_steps": 1}
      ),
    ),
    (
      "metainit",
      "momentum >= 1",
      lambda: methods.initialize("metainit", L, P, [B], {"momentum": 1.0}),
    ),
    (
      "metainit",
      "integer params",
      lambda: methods.initialize("metainit", L, Pint, [B], {"num_steps": 1}),
    ),
    (
      "kaiming",
      "unknown config key",
      lambda: methods.initialize("kaiming", None, P, None, {"x": 1}),
    ),
    (
      "fixup",
      "params without residual branches",
      lambda: methods.initialize("fixup", None, P, None),
    ),
    ("fixup", "config of the wrong type", lambda: methods.initialize("fixup", None, P, None, 5)),
    ("train", "model without .apply", lambda: tr(model=None)),
    ("train", "variables without 'params'", lambda: tr(variables={"batch_stats": {}})),
    (
      "train",
      "integer params",
      lambda: tr(
        variables={
          "params": jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), variables["params"])
        }
      ),
    ),
    (
      "train",
      "NaN in the initial params",
      lambda: tr(
        variables={"params": jax.tree_util.tree_map(lambda x: x * jnp.nan, variables["params"])}
      ),
    ),
    ("train", "train_loader is a list", lambda: tr(train_loader=[B])),
    (
      "train",
      "test_data dict without labels",
      lambda: tr(test_data={"image": np.zeros((4, 12, 12, 1))}),
    ),
    ("train", "stop_after_step=0", lambda: tr(stop_after_step=0)),
    ("train.validate_train_config", "lr NaN", lambda: tcheck(bad_cfg(lr=float("nan")))),
    ("train.validate_train_config", "momentum=1", lambda: tcheck(bad_cfg(momentum=1.0))),
    ("train.validate_train_config", "max_to_keep=1", lambda: tcheck(bad_cfg(max_to_keep=1))),
    ("train.validate_train_config", "unknown schedule", lambda: tcheck(bad_cfg(schedule="linear"))),
    (
      "data.Loader",
      "batch_size=0",
      lambda: data.Loader(ds(np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, int)), 0),
    ),
    (
      "data.ArrayDataset",
      "float images",
      lambda: ds(np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, int)),
    ),
    (
      "data.ArrayDataset",
      "labels/images length mismatch",
      lambda: ds(np.zeros((4, 2, 2, 1), np.uint8), np.zeros(3, int)),
    ),
    ("data.make_loaders", "unknown dataset", lambda: data.make_loaders("foo", 8)),
    ("models.get", "unknown model", lambda: models.get("nope")),
  ]


def bad_input_table():
  """[(entry point, bad input, error class, message)] from actually running each case."""
  rows = []
  for entry, what, fn in _bad_input_cases():
    try:
      fn()
    except (ValueError, TypeError) as e:
      rows.append((entry, what, type(e).__name__, str(e)))
    else:
      raise AssertionError(f"{entry}: {what}: no error")
  return rows


def _md(text):
  return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows):
  lines = ["| entry point | bad input | error | message |", "|---|---|---|---|"]
  lines += [f"| `{e}` | {_md(w)} | `{c}` | {_md(m)} |" for e, w, c, m in rows]
  return "\n".join(lines)


DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
BEGIN, END = (
  "<!-- BEGIN bad-input table (python -m tests.test_fuzz) -->",
  "<!-- END bad-input table -->",
)


def test_bad_input_table_in_docs_is_what_the_library_raises():
  """Whole messages, every row (lists of known names included: when they grow, regenerate
  the table with `python -m tests.test_fuzz`)."""
  want = markdown_table(bad_input_table()).splitlines()
  for path in (DOC,):
    doc = path.read_text()
    got = doc[doc.index(BEGIN) + len(BEGIN) : doc.index(END)].strip().splitlines()
    stale = [f"doc: {a}\nnow: {b}" for a, b in zip(got, want) if a != b]
    assert len(got) == len(want) and not stale, (
      f"{path.name} is stale ({len(got)} rows vs {len(want)}; run python -m tests.test_fuzz):\n"
      + "\n".join(stale[:5])
    )


if __name__ == "__main__":
  new = markdown_table(bad_input_table())
  for path in (DOC,):
    doc = path.read_text()
    path.write_text(
      doc[: doc.index(BEGIN) + len(BEGIN)] + "\n" + new + "\n" + doc[doc.index(END) :]
    )
    print(f"wrote {len(new.splitlines()) - 2} rows to {path}")


def test_no_pickle_or_eval_outside_the_restricted_cifar_reader():
  """Untrusted files: params / checkpoints go through orbax or flax msgpack; the only pickle
  reader is the CIFAR one (RestrictedUnpickler); no config value reaches eval/exec."""
  import ast

  bad = []
  for f in sorted(pathlib.Path(PKG).rglob("*.py")):
    rel = f.relative_to(pathlib.Path(PKG).parent).as_posix()
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if (
          any(
            n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve") for n in names
          )
          and rel != "nio_jax/data/cifar.py"
        ):
          bad.append(f"{rel}:{node.lineno} imports a pickle module")
      if isinstance(node, ast.Call):
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id in ("eval", "exec"):
          bad.append(f"{rel}:{node.lineno} calls {fn.id}")
        if (
          isinstance(fn, ast.Attribute)
          and fn.attr == "load"
          and any(k.arg == "allow_pickle" for k in node.keywords)
        ):
          bad.append(f"{rel}:{node.lineno} np.load(allow_pickle=...)")
  assert not bad, bad
