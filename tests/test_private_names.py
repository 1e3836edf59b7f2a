"""No private name crosses a module boundary inside nio_jax: neither
`from nio_jax.x import _name` nor `module._name` on an imported nio_jax module."""

import ast
import pathlib

import nio_jax

ROOT = pathlib.Path(nio_jax.__file__).parent


def private_uses(source: str) -> list[str]:
  """`_name`s that `source` takes from other nio_jax modules (dunders excepted)."""
  tree = ast.parse(source)
  found, modules = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nio_jax"):
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
        if a.name.startswith("nio_jax"):
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


def test_no_private_names_across_nio_jax_modules():
  bad = {}
  for path in sorted(ROOT.rglob("*.py")):
    uses = private_uses(path.read_text())
    if uses:
      bad[str(path.relative_to(ROOT))] = uses
  assert not bad, f"private names used across modules: {bad}"
