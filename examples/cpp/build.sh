#!/usr/bin/env bash
# Build the greedy example with g++: headers from Debian's libonnxruntime-dev (kernels/fetch_ort_headers.sh), the
# shared library from the onnxruntime Python wheel. Prints the path of the built binary.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
INCLUDE=$("$HERE/../../kernels/fetch_ort_headers.sh")  # the one header fetch, shared with the kernels
CAPI=$("$PYTHON" -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
LIB=$(ls "$CAPI"/libonnxruntime.so.1.* | head -1)
OUT="$HERE/build"
mkdir -p "$OUT"
ln -sf "$LIB" "$OUT/libonnxruntime.so.1"  # the wheel's file is versioned; its soname is libonnxruntime.so.1
g++ -std=c++17 -O2 -I"$INCLUDE" "$HERE/greedy.cpp" "$OUT/libonnxruntime.so.1" -Wl,-rpath,"$OUT" -o "$OUT/greedy" >&2
echo "$OUT/greedy"
