"""JAX vs PyTorch benchmark behind `nio-jax bench` (needs the `torch` extra).

This subpackage is the only part of `nio_jax` that imports PyTorch; nothing else in the
library imports it (`tests/test_cli.py` checks that), so the library installs and runs
without torch. Install the baseline with `pip install 'nio_jax[torch]'`.

* `nio_jax.bench.engine`: the benchmark (`main(argv)`), also run by
  `python -m benchmarks.bench` from a source checkout: it checks and times every row;
* `nio_jax.bench.workloads`: what a row times (the model in both frameworks, the
  formulations, each part's functions);
* `nio_jax.bench.timing`: interleaved medians, compile times, XLA figures, the matmul peak;
* `nio_jax.bench.report`: the environment, the Markdown table and the plot;
* `nio_jax.bench.machine`: load, CPU-time and peak-FLOP/s measurements of the machine
  (torch-free: used by the other scripts in `benchmarks/` too);
* `nio_jax.bench.memory`: peak memory of one part in a fresh subprocess;
* `nio_jax.bench.torch_baseline`: the PyTorch twins of the models and algorithms.
"""

from __future__ import annotations

import importlib

TORCH_EXTRA_HINT = "pip install 'nio_jax[torch]'"


class TorchMissingError(ImportError):
  """PyTorch, which the benchmark compares against, is not installed."""


def require_torch():
  """The `torch` module, or an ImportError that says how to install it.

  Returns:
    The imported `torch` module.

  Raises:
    TorchMissingError: torch is not installed (the message names the `torch` extra).
  """
  try:
    return importlib.import_module("torch")
  except ImportError as e:
    raise TorchMissingError(
      f"nio-jax bench compares against PyTorch, which is not installed ({e}). "
      f"Install the baseline with: {TORCH_EXTRA_HINT}"
    ) from e
