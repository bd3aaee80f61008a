"""The artifact contract: every file name, graph I/O name and symbolic dimension an artifact promises.

Torch-free and import-free on purpose: the build (`edgecompress`), the graph passes and the runtime
(`edgecompress.runtimes`, which an app on the device embeds) all read these names from here, so the
producer and the consumers of an artifact cannot drift apart. The README's "Artifact contract"
tables describe the same facts for people.
"""

from __future__ import annotations

import re

# --- files in an artifact folder --------------------------------------------------------------
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # every weight, as ONNX external data
REPORT_FILE = "report.json"  # how it was built, verification, and the manifest of every other file
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai's config
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PLAN_DIR = "plan"  # a compressed build's plan, reusable with `build --plan OUT/plan`
PLAN_FILE = "plan.json"
FACTORS_FILE = "factors.safetensors"
# Present when the graph uses ai.edgecompress ops: the op library (genai_config's custom_ops_library
# names it) and its manifest (the kernels it ships: SMs, ptxas, hashes).
CUSTOM_OPS_LIBRARY_FILE = "libedgecompress_ops.so"
CUSTOM_OPS_MANIFEST_FILE = "edgecompress_ops.json"

# --- graph inputs and outputs -----------------------------------------------------------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Optional int64 scalar with a default of 0 (an initializer of the same name): the logits of the last
# LOGITS_TO_KEEP positions only, 0 = every position (Hugging Face's argument). Prefill feeds 1.
LOGITS_TO_KEEP = "logits_to_keep"
# %d is the decoder layer's position among the layers the graph keeps (0..L-1, contiguous).
KV_NAMES = {
    "past_key": "past_key_values.%d.key",
    "past_value": "past_key_values.%d.value",
    "present_key": "present.%d.key",
    "present_value": "present.%d.value",
}
KV_KINDS = ("key", "value")
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# Model metadata key, value "1": each present cache may be bound to the same buffer as its past (IO binding), a
# [batch, kv_heads, capacity, head_dim] buffer written in place (onnxruntime-genai's past_present_share_buffer).
# The graph then reads the past length from attention_mask (its width minus the new tokens), never from the
# past's shape, and the cache's valid length is the mask's width.
SHARED_KV_BUFFER = "edgecompress.past_present_share_buffer"

# --- symbolic dimensions (the names onnxruntime-genai's own builder writes) -------------------
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"  # past + new tokens: the mask and the present caches
LOGITS_SEQUENCE = "logits_sequence_length"  # the positions logits are computed for (LOGITS_TO_KEEP)


def past_names(num_layers: int) -> list[str]:
    """past_key_values.{i}.key / .value, layer by layer, key first."""
    return [KV_NAMES[f"past_{kind}"] % i for i in range(num_layers) for kind in KV_KINDS]


def present_names(num_layers: int) -> list[str]:
    return [KV_NAMES[f"present_{kind}"] % i for i in range(num_layers) for kind in KV_KINDS]


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, tokens: int, elem_bytes: int, batch: int = 1) -> int:
    """Bytes of the past/present caches above: a key and a value per layer, [batch, kv_heads, tokens, head_dim]."""
    return 2 * num_layers * batch * kv_heads * tokens * head_dim * elem_bytes


def is_kv_name(name: str) -> bool:
    return name.startswith((PAST_PREFIX, PRESENT_PREFIX))

# onnxruntime provider -> the name genai_config.json's `provider_options` uses for it (CPU: no entry).
GENAI_PROVIDER_NAMES = {
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "WebGpuExecutionProvider": "webgpu",
    "QNNExecutionProvider": "qnn",
    "OpenVINOExecutionProvider": "OpenVINO",
}


def genai_provider_options(execution_providers, provider_options: dict) -> list[dict]:
    """genai_config's `provider_options` for a target: its first provider that genai knows, with its options."""
    for provider in execution_providers:
        if provider in GENAI_PROVIDER_NAMES:
            return [{GENAI_PROVIDER_NAMES[provider]: dict(provider_options.get(provider, {}))}]
    return []
