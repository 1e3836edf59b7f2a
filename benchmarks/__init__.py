"""Benchmark entry scripts; their results live in benchmarks/results/."""

import json


def rerender(json_path: str, render_markdown) -> None:
  """`--render`: rewrite the .md beside a result JSON from the JSON alone (no re-run)."""
  with open(json_path) as f:
    text = render_markdown(json.load(f))
  with open(json_path[: -len(".json")] + ".md", "w") as f:
    f.write(text)
