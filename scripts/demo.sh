#!/usr/bin/env bash
# The README's main command: set up (.venv, package, Fashion-MNIST via apt when possible), then
# NIO on a small CNN + a short Fashion-MNIST training run, with progress bars, ending in a
# small report (markdown table + plots) under runs/fmnist_nio/.
# Measured: see docs/cli.md ("Demo"). Extra arguments go to `nio-jax train`, e.g.
#   bash scripts/demo.sh --set train.num_epochs=2
# NIO_JAX_SKIP_SETUP=1 skips scripts/setup.sh (an existing .venv is used as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${NIO_JAX_SKIP_SETUP:-0}" != 1 ] || [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$(date +%s)
nio-jax train --config configs/fmnist_nio.py "$@"
echo "demo wall time: $(( $(date +%s) - start )) s (training command only)"
