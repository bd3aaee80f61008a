#!/usr/bin/env bash
# The runtime-only install (edgecompress-runtime) on a device-like machine, end to end:
#   1. with the compiler (BUILD_PYTHON's edgecompress): build the runtime wheel, and two artifacts of a tiny
#      random Llama: a dense one, and a compressed one whose graph uses our LowRankMatMul (it carries the
#      custom-op library);
#   2. a fresh venv with only the CPU `onnxruntime` and the runtime wheel: generate, eval, profile and inspect
#      both artifacts from an empty folder; torch, transformers and onnx are not installed; `build` is one line;
#   3. a fresh venv with `onnxruntime-gpu` (PyPI's x86 wheel installs without a GPU) and the runtime wheel:
#      `pip check` is clean, the CPU `onnxruntime` distribution is not installed, `profile --ep cpu` runs
#      and asking for CUDA where there is no GPU is one line.
#
#   .ci/runtime_smoke.sh                 (called by .ci/run; `make runtime-smoke` also runs it)
#
# Settings (environment): BUILD_PYTHON (default .venv/bin/python) has the compiler installed; PYTHON makes the
# fresh venvs (default python3); CONSTRAINTS (default constraints.txt) pins onnxruntime to the tested version;
# ORT_GPU_SPEC is what the second venv installs (default: the newest onnxruntime-gpu on PyPI when this was
# written, 1.31.1; its releases trail the CPU package's). The onnxruntime distributions come from the package
# index (PyPI); nothing else is downloaded.
set -euo pipefail
START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_PYTHON="${BUILD_PYTHON:-$ROOT/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${CONSTRAINTS-$ROOT/constraints.txt}"
ORT_VERSION="$(sed -n 's/^onnxruntime==//p' "$CONSTRAINTS" 2>/dev/null || true)"
ORT_CPU_SPEC="onnxruntime${ORT_VERSION:+==$ORT_VERSION}"
ORT_GPU_SPEC="${ORT_GPU_SPEC:-onnxruntime-gpu==1.31.1}"

SMOKE=runtime-smoke
source "$ROOT/.ci/smoke_common.sh"
# A command that must fail with exactly one `error:` line holding $1, exit 2 and no traceback.
one_line() {
    local fragment="$1"; shift
    printf '+ (must fail)'; printf ' %q' "$@"; printf '\n'
    set +e; "$@" >"$TMP/out.txt" 2>"$TMP/err.txt"; local rc=$?; set -e
    cat "$TMP/err.txt"
    [ $rc -eq 2 ] || { echo "expected exit 2, got $rc" >&2; exit 1; }
    ! grep -q Traceback "$TMP/err.txt" || { echo "a traceback" >&2; exit 1; }
    [ "$(grep -c '^error:' "$TMP/err.txt")" -eq 1 ] || { echo "not one error line" >&2; exit 1; }
    tr '\n' ' ' <"$TMP/err.txt" | grep -qF "$fragment" || { echo "missing: $fragment" >&2; exit 1; }
}

step "the runtime wheel"
run "$BUILD_PYTHON" -P "$ROOT/packaging/runtime_wheel.py" --out "$TMP/dist"
WHEEL="$(ls "$TMP"/dist/edgecompress_runtime-*.whl)"

step "two artifacts of a tiny random Llama, built with the compiler"
WORK="$TMP/work"
mkdir -p "$WORK"
cat >"$WORK/cpu-low-rank.toml" <<'EOF'
name = "cpu-low-rank"
description = "the CPU with our LowRankMatMul enabled"
device = "cpu"
execution_provider = "CPUExecutionProvider"
dtype = "float32"
custom_ops = ["LowRankMatMul"]
EOF
run "$BUILD_PYTHON" -P - "$ROOT" "$WORK" <<'EOF'
import random, sys
from pathlib import Path

sys.path.append(sys.argv[1])  # after site-packages: the repo's tests/ helpers only
from tests.tiny_models import WORDS, save_tiny_model

work = Path(sys.argv[2])
save_tiny_model(work / "tiny-llama")
rng = random.Random(0)
(work / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(300)))
EOF
EC_BUILD=("$BUILD_PYTHON" -P -m edgecompress.cli build "$WORK/tiny-llama" --eval-limit 0 -q)
run "${EC_BUILD[@]}" -o "$WORK/dense"
run "${EC_BUILD[@]}" --target "$WORK/cpu-low-rank.toml" --ratio 0.2 --method grasp-w --calibration "$WORK/text.txt" \
    --calib-sequences 2 --calib-seq-len 16 -o "$WORK/lowrank"
grep -q LowRankMatMul "$WORK/lowrank/report.json"
test -f "$WORK/lowrank/libedgecompress_ops.so"

runtime_venv() {  # $1: folder, $2: the onnxruntime distribution to install with the runtime wheel
    run "$PYTHON" -m venv "$1"
    run "$1/bin/pip" install --quiet "$2" "$WHEEL"
    run "$1/bin/pip" check
}

step "venv 1: the CPU onnxruntime and the runtime wheel only"
runtime_venv "$TMP/cpu" "$ORT_CPU_SPEC"
cd "$WORK"  # an empty-of-sources folder: the installed package only
unset EDGECOMPRESS_DATA PYTHONPATH
export PYTHONNOUSERSITE=1
EC="$TMP/cpu/bin/edgecompress"
"$TMP/cpu/bin/python" - <<'EOF'
import importlib.util
for name in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed in the runtime venv"
print("not installed: torch, transformers, onnx, onnx_ir, onnxscript")
EOF
for artifact in dense lowrank; do
    run "$EC" generate "$WORK/$artifact" "the sky is" -n 8
    run "$EC" eval "$WORK/$artifact" --data "$WORK/text.txt" --seq-len 32 --limit 2
    run "$EC" profile "$WORK/$artifact" -p 8 -n 4 -r 1 --no-ops --format md
    run "$EC" inspect "$WORK/$artifact"
done
"$EC" profile "$WORK/lowrank" -p 8 -n 2 -r 1 --no-ops --format json >"$TMP/profile.json"
"$TMP/cpu/bin/python" -c "import json,sys; s=json.load(open(sys.argv[1]))['device']['software']; \
assert s['onnxruntime_distribution'].startswith('onnxruntime '), s; print('profile names', s['onnxruntime_distribution'])" \
    "$TMP/profile.json"
one_line "build needs the compiler" "$EC" build "$WORK/tiny-llama" -o "$WORK/never"
test ! -e "$WORK/never"

step "venv 2: onnxruntime-gpu and the runtime wheel (no GPU here)"
runtime_venv "$TMP/gpu" "$ORT_GPU_SPEC"
if "$TMP/gpu/bin/pip" show onnxruntime >/dev/null 2>&1; then
    echo "the CPU onnxruntime distribution was installed beside onnxruntime-gpu" >&2
    exit 1
fi
EC="$TMP/gpu/bin/edgecompress"
run "$EC" profile "$WORK/dense" --ep cpu -p 8 -n 4 -r 1 --no-ops --format md | tee "$TMP/profile.md"
grep -q "onnxruntime-gpu" "$TMP/profile.md"
if ! "$TMP/gpu/bin/python" -c "import onnxruntime, sys; sys.exit(0 if 'CUDAExecutionProvider' in \
        onnxruntime.get_available_providers() else 1)"; then
    echo "onnxruntime-gpu lists no CUDA provider here" >&2; exit 1
fi
one_line "CUDA" "$EC" profile "$WORK/dense" --ep cuda -p 8 -n 2 -r 1 --no-ops
