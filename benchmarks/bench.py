"""Entry script of the JAX vs PyTorch benchmark in a source checkout (results land here).

    python -m benchmarks.bench --models resnet20,resnet20_bn --batches 32 --reps 3

The benchmark itself ships in the package (`nio_jax.bench.engine`, run by `nio-jax bench`,
needs `pip install 'nio_jax[torch]'`); this script only sets the results folder to
`benchmarks/results/`.
"""

from __future__ import annotations

import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> dict:
  """Runs `nio_jax.bench.engine.main` with results in `benchmarks/results/`."""
  from nio_jax.bench import engine  # noqa: PLC0415  (needs torch: imported only when run)

  return engine.main(argv, default_out=RESULTS, prog="python -m benchmarks.bench")


if __name__ == "__main__":
  main(sys.argv[1:])
