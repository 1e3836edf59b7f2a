import os

import pytest

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per worker.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache (nio_jax.compile_cache) stays off in tests: a test
# compiles afresh and writes nothing under ~/.cache (tests/test_compile_cache.py turns it on
# in a subprocess with its own directory).
os.environ.setdefault("NIO_JAX_COMPILE_CACHE", "0")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or os.environ.get("NIO_JAX_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow or NIO_JAX_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
