"""Generated text in the docs equals its generator: the parameter-count tables (docs/api.md,
docs/models.md) from the model registry, and the benchmark result tables
(benchmarks/results/*.md) from their JSON. `python -m tests.test_generated_docs` rewrites
the parameter-count tables."""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from nio_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README, MODELS_DOC = (
  ROOT / "docs" / "api.md",
  ROOT / "docs" / "models.md",
)  # README: the short table
BEGIN = "<!-- BEGIN param-count table (python -m tests.test_generated_docs) -->"
END = "<!-- END param-count table -->"


def registry_variants(name):
  """The kwargs variants documented for a registry entry: BN / no norm / Fixup for the CIFAR
  ResNets, BN / no norm for the other models with a `norm` switch, the default otherwise."""
  m = models.get(name)
  if hasattr(m, "variant"):
    return [{}, dict(norm="none"), dict(variant="fixup")]
  if getattr(m, "norm", None) == "bn" and name in ("densenet100", "wrn28_10"):
    return [{}, dict(norm="none")]
  return [{}]


def counts(name, kwargs):
  """(params, batch-norm statistics) from `jax.eval_shape` (no compile)."""
  model = models.get(name, **kwargs)
  x = jax.ShapeDtypeStruct((2,) + models.input_shape(name), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  stats = variables.get("batch_stats", {})
  return models.count_params(variables["params"]), models.count_params(stats) if stats else 0


def _call(name, kwargs):
  args = "".join(f", {k}={v!r}".replace("'", '"') for k, v in kwargs.items())
  return f'`get("{name}"{args})`'


def param_count_tables() -> tuple[str, str]:
  """(docs/models.md table, README table), both generated from the registry."""
  long = ["| registry call | input | params | BN stats (running mean+var) |", "|---|---|---:|---:|"]
  short = ["| model (variants) | params |", "|---|---:|"]
  for name in models.names():
    shape = "x".join(map(str, models.input_shape(name)))
    row = []
    labels = []
    for kw in registry_variants(name):
      p, s = counts(name, kw)
      long.append(f"| {_call(name, kw)} | {shape} | {p:,} | {s:,} |")
      row.append(f"{p:,}")
      labels.append("fixup" if "variant" in kw else ("none" if "norm" in kw else "BN"))
    label = f"{name} ({' / '.join(labels)})" if len(labels) > 1 else name
    short.append(f"| {label} | {' / '.join(row)} |")
  return "\n".join(long), "\n".join(short)


def _between(path):
  text = path.read_text()
  return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def test_param_count_tables_are_generated_from_the_registry():
  long, short = param_count_tables()
  assert _between(MODELS_DOC) == long, "docs/models.md stale: python -m tests.test_generated_docs"
  assert _between(README) == short, "docs/api.md stale: python -m tests.test_generated_docs"


RENDERED = {
  "compile_time_": "compile_time",
  "scaling_": "scaling",
  "compile_cache_": "compile_cache",
  "user_loop_": "user_loop",
  "dispatch_overhead_": "dispatch_overhead",
}
RESULTS = sorted(
  p
  for p in (ROOT / "benchmarks" / "results").glob("*.json")
  if any(p.name.startswith(k) for k in RENDERED)
)


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_benchmark_tables_are_rendered_from_their_json(path):
  """Each committed compile_time_* / scaling_* .md holds only what its generator renders from
  the committed JSON (typed notes belong in docs/performance.md)."""
  import importlib

  module = next(v for k, v in RENDERED.items() if path.name.startswith(k))
  mod = importlib.import_module(f"benchmarks.{module}")
  data = json.loads(path.read_text())
  assert path.with_suffix(".md").read_text() == mod.render_markdown(data)


def test_compile_time_skip_reason_names_the_flag(tmp_path, monkeypatch):
  """Rows skipped by --no-unrolled say so (they used to claim the depth limit)."""
  from benchmarks import compile_time

  out = tmp_path / "ct.json"
  monkeypatch.setattr(compile_time, "time_lower_compile", lambda *a: (0.5, 1.5))
  compile_time.main(["--depths", "20", "--norms", "none", "--no-unrolled", "--out", str(out)])
  rows = json.loads(out.read_text())["results"]
  assert [r.get("skipped") for r in rows] == [None, "--no-unrolled"]
  md = out.with_suffix(".md").read_text()
  assert "| resnet20 | none | unrolled |  | skipped | --no-unrolled |" in md
  assert "Command: `python -m benchmarks.compile_time --depths 20" in md


def test_compile_time_stores_the_quiet_verdict(tmp_path, monkeypatch):
  """The measuring phase's quiet verdict lands in the JSON and the .md; `--render` of a JSON
  written before the verdict was stored says it was not recorded."""
  from benchmarks import compile_time

  out = tmp_path / "ct.json"
  monkeypatch.setattr(compile_time, "time_lower_compile", lambda *a: (0.5, 1.5))
  compile_time.main(["--depths", "20", "--norms", "none", "--no-unrolled", "--out", str(out)])
  data = json.loads(out.read_text())
  quiet = data["meta"]["quiet"]
  assert quiet["verdict"] in ("QUIET", "NOISY", None) and quiet["threshold"] == 0.05
  md = out.with_suffix(".md").read_text()
  assert f"other processes' CPU share {quiet['other_cpu_share']}: **" in md
  del data["meta"]["quiet"]
  out.write_text(json.dumps(data))
  compile_time.main(["--render", str(out)])
  assert "; quiet verdict not recorded." in out.with_suffix(".md").read_text()


if __name__ == "__main__":
  long, short = param_count_tables()
  for path, table in ((MODELS_DOC, long), (README, short)):
    text = path.read_text()
    path.write_text(
      text[: text.index(BEGIN) + len(BEGIN)] + "\n" + table + "\n" + text[text.index(END) :]
    )
    print("wrote", path)


def test_compile_cache_rows_and_verdict(tmp_path, monkeypatch):
  """Every formulation gets a cold and a cached process on one cache directory; an extra XLA
  flag set only a cold one, with its flags passed on; the verdict lands in the .md."""
  from benchmarks import compile_cache

  calls = []

  def fake_child(model, form, batch, reps, cache_dir, flags=""):
    calls.append((form, flags, cache_dir))
    return dict(cache=cache_dir, lower_s=1.0, compile_s=2.0, first_run_s=0.5, step_s=0.25)

  monkeypatch.setattr(compile_cache, "child", fake_child)
  compile_cache.main(["--forms", "a/b", "--xla-flags=--x=1", "--out", str(tmp_path)])
  assert [(f, fl) for f, fl, _ in calls] == [("a/b", ""), ("a/b", ""), ("a/b", "--x=1")]
  assert calls[0][2] == calls[1][2]  # the cached process reads the cold one's directory
  data = json.loads(next(tmp_path.glob("compile_cache_*.json")).read_text())
  assert [sorted(r) for r in data["rows"]] == [
    ["cached", "cold", "flags", "form"],
    ["cold", "flags", "form"],
  ]
  md = next(tmp_path.glob("compile_cache_*.md")).read_text()
  assert "| a/b | - | cached | 1.0 | 2.0 | 3.0 | 0.5 | 0.25 |" in md
  assert "| a/b | --x=1 | cold |" in md
  assert "other processes' CPU share" in md
