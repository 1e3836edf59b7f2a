#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the default test suite on the CPU.
# Slow tests run too when NIO_JAX_SLOW=1 (or pass --runslow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export JAX_PLATFORMS=cpu
# One code style (configured in pyproject.toml): fail fast before the long suite.
ruff format --check .
ruff check .
# --durations: the slowest tests are listed, to keep the suite within its ~15 min budget.
PYTEST=(python -m pytest -n "${NIO_JAX_TEST_WORKERS:-2}" --timeout 1200 --durations=30 -q)
# tests/test_speed_formulations.py runs in pytest processes of its own. In the full run
# (slow tests included) an XLA:CPU segmentation fault hit it twice, in the worker that had
# run other tests before it (a different case each time); alone, all of its 66 tests pass.
# Not understood yet: see docs/tests.md.
ISOLATED=tests/test_speed_formulations.py
if [ "$#" -eq 0 ]; then
  "${PYTEST[@]}" --ignore="$ISOLATED"
  exec "${PYTEST[@]}" "$ISOLATED"
fi
exec "${PYTEST[@]}" "$@"
