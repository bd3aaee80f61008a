#!/usr/bin/env bash
# GPU check of the edgecompress CUDA kernels (< 8 minutes on one H100/H200; needs PyTorch with CUDA and
# Triton, nothing from the network). Correctness of every op/dtype through the C entry points and through
# Triton's JIT, then timings vs cuBLAS and dense; results in bench/results/kernels-<gpu>.json (and $OUT).
#
#   bench/gpu/check.sh                 # on the GPU machine (carry kernels/build/ with the working tree)
#   bench/gpu/check.sh --prepare       # on the dev machine first: cubins + a prebuilt launch library
#   bench/gpu/check.sh --dry-run       # anywhere: list and build every case, no GPU
#   bench/gpu/check.sh --plan DIR      # SmolLM2 ranks from a plan instead of the rank formula
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
else PY=$(command -v python3 || command -v python); fi

if [ "${1:-}" = "--prepare" ]; then
  # The cubins, then the library (libedgecompress_ops.so exports the ec_cuda_* entry points too); a
  # launch-only library if that build is not available. The GPU run needs only kernels/build/ec_cubins.h
  # and manifest.json when the GPU machine has g++ (the Triton cache there is not needed).
  "$PY" -m edgecompress.kernels.aot --out kernels/build
  if ! "$PY" -m edgecompress.kernels --build --out kernels/build; then
    g++ -std=c++17 -O2 -shared -fPIC -fvisibility=hidden -Ikernels/build kernels/csrc/cuda_launch.cc \
      kernels/csrc/c_api.cc -o kernels/build/libec_launch.so -Wl,--no-undefined
  fi
  echo "prepared kernels/build ($(du -sh kernels/build | cut -f1)); carry kernels/build (or just its" \
       "ec_cubins.h, manifest.json and libedgecompress_ops.so) to the GPU machine"
  exit 0
fi
exec timeout 480 "$PY" bench/gpu/check_kernels.py "$@"
