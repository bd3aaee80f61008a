"""The low-bit blocks of a GGUF source, read with the `gguf` library, for MapGgufWeightsPass.

Q4_1 and Q8_0 Linear weights of a llama-style GGUF come out as `GgufBlocks` by module name, in
torch's row order (llama.cpp permutes the q/k rows for its rope layout; transformers undoes that
when it loads the file, and so does this reader).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgecompress.errors import EdgeCompressError

# GGUF tensor names (llama.cpp) -> module names relative to *ForCausalLM.
_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
# Which source block kinds map exactly for each requested format.
EXACT_KINDS = {"int4": ("Q4_1", "Q8_0"), "int8": ("Q8_0",)}


def exact_blocks(path: str | Path, weights: str, include_lm_head: bool = True) -> dict:
    """The blocks of `path` that `weights` (int8, int4) can carry exactly, by module name."""
    if not Path(path).is_file():
        raise EdgeCompressError(f"GGUF source '{path}' does not exist")
    return {
        module: found
        for module, found in read_gguf_blocks(path).items()
        if found.kind in EXACT_KINDS[weights] and (include_lm_head or module != "lm_head")
    }


def read_gguf_blocks(path: str | Path) -> dict:
    """Q4_1 / Q8_0 Linear weights of a llama-style GGUF as GgufBlocks by module name, torch row order.

    A tied lm_head (no `output.weight`) is read from `token_embd.weight`.
    """
    from gguf import GGUFReader

    from edgecompress.passes.map_gguf_weights import GgufBlocks

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
