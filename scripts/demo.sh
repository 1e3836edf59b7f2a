#!/usr/bin/env bash
# The README's main command: set up (.venv, package, Fashion-MNIST via apt when possible), then
# compare Kaiming, NIO and GradInit on VGG-19 without normalisation (x1/8) on Fashion-MNIST:
# the same seed and data order, 150 training steps each, test accuracy every 25 steps. It
# ends with one picture (runs/demo/compare.png: accuracy curves, GC and gradient norm before
# and after each search), a table and a sentence (runs/demo/compare.md).
# It also writes benchmarks/results/demo_cpu.json (the table's data, wall times, command,
# commit and quiet verdict; benchmarks/demo_record.py), from which
# `python -m benchmarks.docs_figures` renders the README's demo table and
# docs/images/demo_compare.png. Extra arguments go to `nio-jax compare`, e.g.
#   bash scripts/demo.sh --methods kaiming,nio
# NIO_JAX_SKIP_SETUP=1 skips scripts/setup.sh (an existing .venv is used as it is).
# The demo's own output folder runs/demo is started afresh on every call.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${NIO_JAX_SKIP_SETUP:-0}" != 1 ] || [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
rm -rf runs/demo
start=$(date +%s)
python -m benchmarks.demo_record --workdir runs/demo \
  --command-as-typed "${NIO_JAX_DEMO_COMMAND:-bash scripts/demo.sh${*:+ $*}}" \
  -- nio-jax compare --config configs/fmnist_compare.py --workdir runs/demo "$@"
echo "demo wall time: $(( $(date +%s) - start )) s (the compare command, after setup)"
