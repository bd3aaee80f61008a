#!/usr/bin/env bash
# The built wheel, end to end: build it from a copy of the source, install it NON-editable with its
# dependencies in a fresh virtual environment, then from an empty folder (the source tree is not
# importable) with EDGECOMPRESS_DATA unset and the Hugging Face Hub offline: build a tiny random
# Llama (a Hugging Face folder), compress it with grasp, generate from it and inspect it.
#
#   .ci/wheel_smoke.sh                      (called by .ci/run; `make wheel-smoke` also runs it)
#
# Settings (environment): BUILD_PYTHON builds the wheel, offline (needs setuptools; default
# .venv/bin/python); PYTHON makes the fresh venv (default python3); TORCH_SPEC is installed first,
# the CPU build (default torch==2.13.0, as in the Makefile); TORCH_INDEX_URL, when set, is an extra
# index for it (e.g. https://download.pytorch.org/whl/cpu where no CPU wheel is at hand); CONSTRAINTS
# is the pip constraints file every install takes (default the repo's constraints.txt, the versions CI
# tested; set it empty for the newest allowed). The dependencies come from the usual package index
# (PyPI); nothing else is downloaded.
set -euo pipefail
START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

absolute() {  # an absolute path for a command given as a path, without resolving symlinks (venvs)
    case "$1" in
        */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;;
        *) command -v "$1" ;;
    esac
}
BUILD_PYTHON="$(absolute "${BUILD_PYTHON:-$ROOT/.venv/bin/python}")"
PYTHON="$(absolute "${PYTHON:-python3}")"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="${CONSTRAINTS-$ROOT/constraints.txt}"
PIP_CONSTRAINTS=()
if [ -n "$CONSTRAINTS" ]; then PIP_CONSTRAINTS=(-c "$(cd "$(dirname "$CONSTRAINTS")" && pwd)/$(basename "$CONSTRAINTS")"); fi

SMOKE=wheel-smoke
source "$ROOT/.ci/smoke_common.sh"

step "build the wheel from a copy of the build inputs (offline, no build isolation)"
mkdir "$TMP/src" "$TMP/dist"
# The top-level files (pyproject.toml, setup.py, README.md, ...) and the source folders only: no
# .venv, .git, out/ or stale build/ from the checkout, and nothing written into it.
(cd "$ROOT" && find . -maxdepth 1 -type f -print0 \
    | tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - --null -T - \
        edgecompress passes runtimes kernels targets) | tar -C "$TMP/src" -xf -
run "$BUILD_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-index \
    -w "$TMP/dist" "$TMP/src"
WHEEL="$(ls "$TMP"/dist/edgecompress-*.whl)"
echo "built $(basename "$WHEEL")"

step "fresh virtual environment, CPU torch first, then the wheel (non-editable) with its dependencies"
run "$PYTHON" -m venv "$TMP/venv"
VENV_BIN="$TMP/venv/bin"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    run "$VENV_BIN/pip" install --quiet "${PIP_CONSTRAINTS[@]}" --extra-index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
    run "$VENV_BIN/pip" install --quiet "${PIP_CONSTRAINTS[@]}" "$TORCH_SPEC"
fi
run "$VENV_BIN/pip" install --quiet "${PIP_CONSTRAINTS[@]}" "$WHEEL"
if "$VENV_BIN/pip" list --format=freeze | grep -i '^nvidia-'; then
    echo "CUDA packages were installed (above): torch is not the CPU build" >&2
    exit 1
fi

step "run from an empty folder: the installed package only"
WORK="$TMP/work"
mkdir "$WORK"
cd "$WORK"
unset EDGECOMPRESS_DATA PYTHONPATH
export PYTHONNOUSERSITE=1 HF_HOME="$TMP/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="$VENV_BIN/python"
run "$PY" - "$TMP/venv" <<'EOF'
import importlib.util, sys
from pathlib import Path

import edgecompress, edgecompress.attribution, edgecompress.passes, edgecompress.runtimes.session

venv = Path(sys.argv[1]).resolve()
where = Path(edgecompress.__file__).resolve()
assert venv in where.parents, f"edgecompress imported from {where}, not from the fresh venv {venv}"
from importlib import metadata
from edgecompress.folder_names import FOLDERS
# Our wheel installs no top-level passes/runtimes/kernels/targets (other distributions may: transformers
# requires Hugging Face's `kernels`, and that one must be what `import kernels` finds).
tops = {Path(str(entry)).parts[0] for entry in metadata.files("edgecompress")}
leaks = sorted(tops & set(FOLDERS))
assert not leaks, f"top-level packages installed by the wheel: {leaks}"
for name in FOLDERS:
    spec = importlib.util.find_spec(name)
    assert spec is None or venv in Path(spec.origin).resolve().parents, (name, spec)
import torch
print(f"edgecompress from {where.parent}; torch {torch.__version__}; no top-level passes/runtimes")
EOF

# A tiny random Llama with a word-level tokenizer and a chat template (the idea of tests/tiny_models.py,
# which is not in the wheel), and calibration text made of the tokenizer's words.
run "$PY" - "$WORK/tiny-llama" "$WORK/calib.txt" <<'EOF'
import random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

folder, calib = Path(sys.argv[1]), Path(sys.argv[2])
words = sorted(set((
    "the sky is blue because air scatters short light waves more than long ones explain in one "
    "sentence why a cat sat on mat and dog ran far away from home to see sea red green user assistant system"
).split()))
specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
vocab = {tok: i for i, tok in enumerate(specials + words + [".", ",", "?", "\n"])}
core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=core, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
    pad_token="<|im_end|>",
)
tokenizer.chat_template = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
config = LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    tie_word_embeddings=True,
)
assert len(vocab) <= config.vocab_size, (len(vocab), config.vocab_size)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    model.lm_head.weight.mul_(8.0)  # random init gives near-uniform logits: separate greedy choices
model.save_pretrained(folder)
tokenizer.save_pretrained(folder)

rng = random.Random(0)
lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + " ." for _ in range(200)]
calib.write_text("\n".join(lines) + "\n")
print(f"tiny Llama in {folder} ({sum(p.numel() for p in model.parameters())} parameters), "
      f"{len(lines)} calibration lines in {calib}")
EOF

EC="$VENV_BIN/edgecompress"
step "edgecompress build (grasp, ratio 0.2)"
run "$EC" build "$WORK/tiny-llama" --ratio 0.2 --method grasp --calibration "$WORK/calib.txt" \
    --calib-sequences 2 --calib-seq-len 16 --eval-limit 0 -o "$WORK/out"
step "edgecompress generate"
run "$EC" generate "$WORK/out" "the sky is" -n 8
step "edgecompress inspect"
run "$EC" inspect "$WORK/out"
