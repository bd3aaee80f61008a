"""Weight formats for an artifact (fp32 as exported, or int8/int4 MatMulNBits) and ORT fusion.

`quantize_artifact` rewrites folder/model.onnx(+.data) in place. With a GGUF source, Linears whose
blocks are already low-bit (Q4_1 for int4; Q8_0 for int4 and int8) keep the source values exactly
(GgufWeightsPass); every other constant-weight MatMul, low-rank factors included, is quantized
round-to-nearest (QuantizeWeightsPass).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import EdgeCompressError

WEIGHT_FORMATS = ("fp32", "int8", "int4")
# GGUF tensor names (llama.cpp) -> module names relative to *ForCausalLM.
_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
# Which source block kinds map exactly for each requested format.
_EXACT_KINDS = {"int4": ("Q4_1", "Q8_0"), "int8": ("Q8_0",)}


def quantize_artifact(
    folder: str | Path,
    weights: str = "int4",
    block_size: int = 32,
    source_gguf: str | Path | None = None,
    symmetric: bool = False,
    accuracy_level: int | None = 4,
    include_lm_head: bool = True,
    gguf_q4_1_form: str = "block_sum",
) -> dict[str, Any]:
    """Rewrite the artifact's MatMul weights to `weights`; returns the pass counts for the report.

    `accuracy_level` 4 (int8 activations) is onnxruntime's fast CPU kernel; None runs fp32 compute,
    measured slower than dense fp32 on smollm2-135m decode. `gguf_q4_1_form`: see GgufWeightsPass.
    """
    import onnx_ir as ir

    from edgecompress.export import MODEL_FILE
    from edgecompress.passes.gguf_weights import GgufWeightsPass
    from edgecompress.passes.quantize_weights import QuantizeWeightsPass, check_format
    from edgecompress.transform import _save_replacing

    if weights not in WEIGHT_FORMATS:
        raise EdgeCompressError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    counts: dict[str, Any] = {"weights": weights}
    if weights == "fp32":
        return counts
    bits = 4 if weights == "int4" else 8
    check_format(bits, block_size, accuracy_level)  # fail before loading anything
    if source_gguf is not None and not Path(source_gguf).is_file():
        raise EdgeCompressError(f"GGUF source '{source_gguf}' does not exist")
    started = time.perf_counter()
    folder = Path(folder)
    model = ir.load(str(folder / MODEL_FILE))
    if source_gguf is not None:
        blocks = {
            module: found
            for module, found in read_gguf_blocks(source_gguf).items()
            if found.kind in _EXACT_KINDS[weights] and (include_lm_head or module != "lm_head")
        }
        gguf = GgufWeightsPass(blocks, accuracy_level=accuracy_level, q4_1_form=gguf_q4_1_form)
        result = gguf(model)
        counts["GgufWeightsPass"] = {"modified": result.modified, **dataclasses.asdict(gguf.stats)}
    rtn = QuantizeWeightsPass(bits, block_size, symmetric, accuracy_level, include_lm_head)
    result = rtn(model)
    counts["QuantizeWeightsPass"] = {"modified": result.modified, **dataclasses.asdict(rtn.stats)}
    _save_replacing(model, folder)
    counts["seconds"] = round(time.perf_counter() - started, 2)
    return counts


def fuse_artifact(folder: str | Path) -> dict[str, Any]:
    """onnxruntime fusions on folder/model.onnx in place: FuseOrtOpsPass, then MultiHeadAttention over
    the repeated KV cache → GroupQueryAttention. Run after quantize_artifact."""
    import onnx_ir as ir

    from edgecompress.export import MODEL_FILE
    from edgecompress.passes.fuse_group_query_attention import FuseGroupQueryAttentionPass
    from edgecompress.passes.fuse_ort_ops import FuseOrtOpsPass
    from edgecompress.transform import _save_replacing

    started = time.perf_counter()
    folder = Path(folder)
    model = ir.load(str(folder / MODEL_FILE))
    fuse, gqa = FuseOrtOpsPass(), FuseGroupQueryAttentionPass()
    counts = {}
    for fusion in (fuse, gqa):
        result = fusion(model)
        counts[type(fusion).__name__] = {"modified": result.modified, **dataclasses.asdict(fusion.stats)}
    if gqa.stats.fused:  # the expected attention fusion did happen, one step further
        counts["FuseOrtOpsPass"]["missing"].pop("GQA", None)
    _save_replacing(model, folder)
    counts["seconds"] = round(time.perf_counter() - started, 2)
    return counts


def read_gguf_blocks(path: str | Path) -> dict:
    """Q4_1 / Q8_0 Linear weights of a llama-style GGUF as GgufBlocks by module name, torch row order.

    A tied lm_head (no `output.weight`) is read from `token_embd.weight`.
    """
    from gguf import GGUFReader

    from edgecompress.passes.gguf_weights import GgufBlocks

    reader = GGUFReader(str(path))
    heads, kv_heads = _field(reader, "attention.head_count"), _field(reader, "attention.head_count_kv")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    names = {}
    for name in tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if match and match.group(2) in _GGUF_LINEARS:
            names[name] = f"model.layers.{match.group(1)}.{_GGUF_LINEARS[match.group(2)]}"
    names["output.weight" if "output.weight" in tensors else "token_embd.weight"] = "lm_head"
    blocks = {}
    for name, module in names.items():
        tensor = tensors.get(name)
        kind = tensor.tensor_type.name if tensor is not None else None
        if kind not in _BLOCK_BYTES:
            continue
        k, n = (int(dim) for dim in tensor.shape)  # GGUF lists dims innermost first
        raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // 32, _BLOCK_BYTES[kind])
        found = _unpack(kind, raw)
        if name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
            found = _unpermute_rows(found, heads if "attn_q" in name else kv_heads or heads)
        blocks[module] = GgufBlocks(kind, *found)
    return blocks


def _field(reader, suffix: str) -> int | None:
    for key, field in reader.fields.items():
        if key.endswith("." + suffix):
            return int(field.parts[field.data[0]][0])
    return None


def _unpack(kind: str, raw: np.ndarray) -> tuple:
    n, n_blocks, _ = raw.shape
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        codes = raw[..., 2:34].copy().view(np.int8)
        return codes.reshape(n, -1), d, None
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = raw[..., 4:20]
    # Q4_1: element j of a block is the low nibble of byte j, element j+16 the high nibble.
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return codes.reshape(n, -1), d, m


def _unpermute_rows(found: tuple, n_head: int) -> tuple:
    """Undo llama.cpp's rope permutation of q/k rows, as transformers does when it loads a GGUF."""
    codes = found[0]
    n = codes.shape[0]
    order = np.arange(n).reshape(n_head, 2, n // n_head // 2).swapaxes(1, 2).reshape(n)
    # llama.cpp's permute sends torch row order[i] to file row i; torch row r = file row inverse[r].
    inverse = np.argsort(order)
    return tuple(None if array is None else array[inverse] for array in found)
