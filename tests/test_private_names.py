"""No private name crosses a module boundary in nio_jax/, benchmarks/ or tests/: neither
`from nio_jax.x import _name` nor `module._name` on an imported module of this repository
(nio_jax, benchmarks, tests)."""

import ast
import pathlib

import pytest

import nio_jax

ROOT = pathlib.Path(nio_jax.__file__).parent
REPO = ROOT.parent
PACKAGES = ("nio_jax", "benchmarks", "tests")  # the repository's own modules


def _ours(module: str) -> bool:
  return module.split(".")[0] in PACKAGES


def private_uses(source: str) -> list[str]:
  """`_name`s that `source` takes from other modules of this repository (dunders excepted)."""
  tree = ast.parse(source)
  found, modules = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and _ours(node.module or ""):
      for a in node.names:
        if a.name.startswith("_") and not a.name.startswith("__"):
          found.append(f"from {node.module} import {a.name}")
        else:
          modules.add(a.asname or a.name)  # may be a module (from nio_jax import scales)
    elif isinstance(node, ast.ImportFrom) and node.level:  # relative: from ._common import
      for a in node.names:
        if a.name.startswith("_") and not a.name.startswith("__"):
          found.append(f"from {'.' * node.level}{node.module or ''} import {a.name}")
    elif isinstance(node, ast.Import):
      for a in node.names:
        if _ours(a.name):
          modules.add(a.asname or a.name.split(".")[0])
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
      and isinstance(node.value, ast.Name)
      and node.value.id in modules
    ):
      found.append(f"{node.value.id}.{node.attr}")
  return found


def test_scanner_finds_private_imports():
  src = "from nio_jax.cosine import _stats\nfrom nio_jax import scales as sc\nsc._leaf(1)\n"
  assert private_uses(src) == ["from nio_jax.cosine import _stats", "sc._leaf"]
  assert private_uses("from nio_jax import scales\nscales.leaf_norms(1)\n") == []
  assert private_uses(
    "from tests.test_train import _setup\nimport benchmarks.sweep as s\ns._x\n"
  ) == [
    "from tests.test_train import _setup",
    "s._x",
  ]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_modules(package):
  bad = {}
  for path in sorted((REPO / package).rglob("*.py")):
    uses = private_uses(path.read_text())
    if uses:
      bad[str(path.relative_to(REPO))] = uses
  assert not bad, f"private names used across modules: {bad}"
