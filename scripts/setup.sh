#!/usr/bin/env bash
# Sets up everything from the project's own files: a virtualenv in .venv with the package and
# its test extras (torch==2.13.0, the CPU wheel; tensorflow-datasets) at the tested versions, and the real Fashion-MNIST IDX files from the
# Debian package dataset-fashion-mnist when running as root with apt (see ../shared/DATA.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# constraints.txt: the exact set CI tests (pyproject.toml bounds each dependency around it).
python -m pip install -q -c constraints.txt -e ".[test]"
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ -z "${NIO_JAX_DATA:-}" ] && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip" >&2
fi
