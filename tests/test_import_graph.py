"""The core of `nio_jax` has no import loop and imports nothing above it.

The module graph is read from the `import` statements of `nio_jax/*.py` with `ast` (function-
level imports included: a lazy import is still an arrow), so a loop is caught before it bites
at import time. The core is the first layer of docs/architecture.md.
"""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "nio_jax"

# docs/architecture.md, layer "core": pure functions over pytrees, without Flax.
CORE = {
  "batches",
  "checks",
  "cosine",
  "distributed",
  "errors",
  "formulation",
  "jaxpr_rewrites",
  "jaxpr_sites",
  "leaves",
  "per_example",
  "per_example_norms",
  "rescale_adam",
  "results",
  "scales",
  "search",
  "step_cache",
  "stochastic",
}


def _module(name: str) -> str | None:
  """`"nio_jax.x.y"` -> `"x.y"` when it is a module or package of nio_jax (`""`: the
  package's face), else None."""
  if name != "nio_jax" and not name.startswith("nio_jax."):
    return None
  rel = name[len("nio_jax.") :] if name != "nio_jax" else ""
  path = PKG / rel.replace(".", "/")
  if rel == "" or path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
    return rel
  return None


def imported(path: pathlib.Path) -> set[str]:
  """The `nio_jax` modules and packages `path` imports, as names under the package
  (`"cosine"`, `"methods"`, `"methods.nio"`; `""` for the package's face, e.g.
  `from nio_jax import measure`)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found = [_module(a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from M import x`: the module M.x when x is one, else M (x is a name in it)
      found = [_module(f"{node.module}.{a.name}") for a in node.names]
      found = [_module(node.module) if f is None else f for f in found]
    else:
      continue
    out.update(f for f in found if f is not None)
  return out


def graph() -> dict[str, set[str]]:
  return {p.stem: imported(p) - {p.stem} for p in PKG.glob("*.py") if p.stem != "__init__"}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `g` (as a path that returns to its start), or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(v):
    state[v] = 1
    stack.append(v)
    for w in sorted(g.get(v, ())):
      if state.get(w) == 1:
        return stack[stack.index(w) :] + [w]
      if w not in state and (found := visit(w)):
        return found
    state[v] = 2
    stack.pop()
    return None

  for v in sorted(g):
    if v not in state and (found := visit(v)):
      return found
  return None


def test_every_core_module_is_listed():
  assert CORE <= {p.stem for p in PKG.glob("*.py")}, CORE - {p.stem for p in PKG.glob("*.py")}


def test_the_core_imports_nothing_above_it():
  g = graph()
  above = {m: sorted(g[m] - CORE) for m in sorted(CORE) if g[m] - CORE}
  assert not above, f"core modules importing layers above the core: {above}"


def test_the_core_has_no_import_loop():
  g = graph()
  core = {m: g[m] & CORE for m in CORE}
  assert find_cycle(core) is None, " -> ".join(find_cycle(core))


def test_the_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
