#!/usr/bin/env bash
# Builds libonednn_conv.so (the oneDNN convolution FFI handlers) next to this script.
#
#   bash native/onednn_conv/build.sh            # against Debian's libdnnl-dev (OpenMP)
#   ONEDNN_PREFIX=/path bash native/onednn_conv/build.sh   # another oneDNN (include/, lib/)
#
# Needs: g++ (C++17), the active Python's jax/jaxlib (for the XLA FFI headers), and a oneDNN
# with a usable CPU engine: `apt-get install libdnnl-dev` (oneDNN 2.6.3, OpenMP threading).
# The PyPI wheel `onednn`/`onednn-devel` 2026.1.0 is the SYCL (DPC++) build: its CPU engine
# needs a SYCL CPU device, which that wheel set does not provide here (see README.md); with
# ONEDNN_PREFIX pointing at it the library builds but every call fails at engine creation.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
ffi_inc="$("$py" -c 'import jax; print(jax.ffi.include_dir())')"
cxx="${CXX:-g++}"
flags=(-O2 -std=c++17 -fPIC -shared -Wall -Wno-unused-function)
if [[ -n "${ONEDNN_PREFIX:-}" ]]; then
  inc=(-I"$ONEDNN_PREFIX/include")
  lib=(-L"$ONEDNN_PREFIX/lib" -Wl,--disable-new-dtags,-rpath,"$ONEDNN_PREFIX/lib")
else
  if [[ ! -f /usr/include/oneapi/dnnl/dnnl.hpp ]]; then
    echo "build.sh: oneDNN headers not found: apt-get install libdnnl-dev, or set ONEDNN_PREFIX" >&2
    exit 1
  fi
  inc=()
  lib=()
fi
# -fopenmp: the handlers call omp_set_num_threads with an OpenMP build of oneDNN.
"$cxx" "${flags[@]}" -fopenmp -isystem "$ffi_inc" "${inc[@]}" "$here/conv.cc" -o "$here/libonednn_conv.so" \
  "${lib[@]}" -ldnnl
echo "built $here/libonednn_conv.so"
