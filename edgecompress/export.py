"""Export a Hugging Face decoder to ONNX with a flat KV cache, through torch.onnx's dynamo exporter.

The exported I/O follows `edgecompress.contract` (the names onnxruntime-genai and optimum use), so
the folder drops into those runtimes unchanged:
  inputs  input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq],
          past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
  outputs logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, total, head_dim]
The export stays in memory as an onnx-ir model, so the graph passes run on it before anything is
written; `save_model` writes the artifact's model files once.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress import contract
from edgecompress.contract import BATCH, DATA_FILE, MODEL_FILE, PAST_SEQUENCE, SEQUENCE, TOTAL_SEQUENCE
from edgecompress.errors import EdgeCompressError, first_line


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) as the attention modules use them."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim


def make_flat_kv_module(model: Any):
    """Wrap `model` so the KV cache is a flat list of tensors (torch.export cannot take a Cache)."""
    import torch
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers

    class FlatKVDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return FlatKVDecoder().eval()


def sample_inputs(config: Any, batch: int = 2, seq: int = 3, past: int = 4):
    """Tracing inputs. Every dynamic dim is >= 2 so torch.export does not specialise it to a constant."""
    import torch

    num_layers, kv_heads, head_dim = kv_geometry(config)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * num_layers)]
    return (input_ids, attention_mask, position_ids, *kv)


def export_onnx(model: Any, opset: int = 18) -> tuple[Any, dict[str, Any]]:
    """Export `model` (fp32, eval) to an in-memory onnx-ir model; returns it with the export facts."""
    import torch

    num_layers = model.config.num_hidden_layers
    wrapper = make_flat_kv_module(model)
    # One named Dim per meaning, shared by every input that has it: with independent DYNAMIC dims the
    # key and value caches get different symbols, and onnxscript's attention fusion then refuses to
    # match because it cannot prove the key and value lengths equal.
    batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
    past, total = torch.export.Dim(PAST_SEQUENCE), torch.export.Dim(TOTAL_SEQUENCE)
    dynamic_shapes = {
        contract.INPUT_IDS: {0: batch, 1: seq},
        contract.ATTENTION_MASK: {0: batch, 1: total},
        contract.POSITION_IDS: {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                sample_inputs(model.config),
                dynamo=True,  # torch 2.13 has no silent fallback to the TorchScript exporter
                opset_version=opset,
                input_names=contract.input_names(num_layers),
                output_names=contract.output_names(num_layers),
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # torch.export raises many kinds; the user needs the first line
            raise EdgeCompressError(f"torch.onnx dynamo export failed: {first_line(exc)}") from exc
    _name_io_dims(program.model)
    program.model.producer_name = "edgecompress"
    return program.model, {
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
        "opset": opset,
        "seconds": round(time.perf_counter() - started, 2),
        "num_layers": num_layers,
    }


def save_model(model: Any, folder: Path) -> None:
    """Write folder/model.onnx with every weight in folder/model.onnx.data (the contract's names)."""
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(folder / MODEL_FILE), external_data=DATA_FILE)


def kv_layers(model: Any) -> int:
    """Decoder layers the graph keeps: one past key input each."""
    return sum(1 for value in model.graph.inputs if contract.PAST_INPUT.match(value.name or "")) // 2


def _name_io_dims(model: Any) -> None:
    """Give graph I/O readable symbolic dims, the names onnxruntime-genai's own builder uses."""
    import onnx_ir as ir

    graph = model.graph
    for value in graph.inputs:
        dims = list(value.shape)
        if value.name in (contract.INPUT_IDS, contract.POSITION_IDS):
            dims = [BATCH, SEQUENCE]
        elif value.name == contract.ATTENTION_MASK:
            dims = [BATCH, TOTAL_SEQUENCE]
        else:
            dims = [BATCH, dims[1], PAST_SEQUENCE, dims[3]]
        value.shape = ir.Shape(dims)
    for value in graph.outputs:
        dims = list(value.shape)
        if value.name == contract.LOGITS:
            dims = [BATCH, SEQUENCE, dims[2]]
        else:
            dims = [BATCH, dims[1], TOTAL_SEQUENCE, dims[3]]
        value.shape = ir.Shape(dims)


GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def _special_tokens(generation_config: Any, tokenizer: Any) -> tuple[Any, list, Any]:
    """(bos, eos list, pad): the generation config's, else the tokenizer's (pad: else the first eos)."""
    gen = generation_config
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_list = eos if isinstance(eos, list) else [eos]
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_list[0]
    bos = getattr(gen, "bos_token_id", None)
    return (tokenizer.bos_token_id if bos is None else bos), eos_list, pad


def _genai_search(gen: Any, context: int) -> dict[str, Any]:
    """The `search` section: greedy unless the generation config samples, then its sampling settings."""
    do_sample = bool(getattr(gen, "do_sample", False))
    return {
        "do_sample": do_sample,
        "early_stopping": True,
        "length_penalty": float(getattr(gen, "length_penalty", 1.0) or 1.0),
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": int(getattr(gen, "no_repeat_ngram_size", 0) or 0),
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": float(getattr(gen, "repetition_penalty", 1.0) or 1.0),
        "temperature": float(getattr(gen, "temperature", 1.0) or 1.0) if do_sample else 1.0,
        "top_k": int(getattr(gen, "top_k", 50) or 50) if do_sample else 1,
        "top_p": float(getattr(gen, "top_p", 1.0) or 1.0) if do_sample else 1.0,
    }


def genai_config(config: Any, generation_config: Any, tokenizer: Any, num_layers: int | None = None,
                 provider_options: list[dict] | None = None) -> dict[str, Any]:
    """genai_config.json for onnxruntime-genai; search settings come from the generation config.

    `num_layers`: the decoder layers the graph keeps (fewer than the config's after layer removal);
    `provider_options`: the target's provider and its options (contract.genai_provider_options; CPU: [])."""
    config_layers, kv_heads, head_dim = kv_geometry(config)
    bos, eos_list, pad = _special_tokens(generation_config, tokenizer)
    context = int(getattr(config, "max_position_embeddings", 2048))
    decoder = {
        "filename": MODEL_FILE,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options or []},
        "head_size": head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": config_layers if num_layers is None else num_layers,
        "inputs": {
            "input_ids": contract.INPUT_IDS,
            "attention_mask": contract.ATTENTION_MASK,
            "position_ids": contract.POSITION_IDS,
            "past_key_names": contract.KV_NAMES["past_key"],
            "past_value_names": contract.KV_NAMES["past_value"],
        },
        "outputs": {
            "logits": contract.LOGITS,
            "present_key_names": contract.KV_NAMES["present_key"],
            "present_value_names": contract.KV_NAMES["present_value"],
        },
    }
    return {
        "model": {"type": GENAI_TYPES[config.model_type], "bos_token_id": bos, "eos_token_id": eos_list,
                  "pad_token_id": pad, "vocab_size": config.vocab_size, "context_length": context, "decoder": decoder},
        "search": _genai_search(generation_config, context),
    }


def write_sidecar_files(out_dir: Path, loaded: Any, num_layers: int | None = None, profile: Any = None) -> list[str]:
    """genai_config.json, config.json, generation_config.json, tokenizer files and chat template.

    `num_layers`: the decoder layers the graph keeps, for genai_config.json (default: the config's);
    `profile`: the target, whose provider and options genai_config.json names."""
    tokenizer = loaded.tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    providers = None
    if profile is not None:
        providers = contract.genai_provider_options(profile.execution_provider, profile.provider_options)
    genai = genai_config(loaded.config, loaded.generation_config, tokenizer, num_layers, providers)
    (out_dir / contract.GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=2) + "\n")
    loaded.config.to_json_file(str(out_dir / contract.CONFIG_FILE))
    if loaded.generation_config is not None:
        loaded.generation_config.to_json_file(str(out_dir / contract.GENERATION_CONFIG_FILE))
    tokenizer.save_pretrained(str(out_dir))
    template = getattr(tokenizer, "chat_template", None)
    if template and not (out_dir / contract.CHAT_TEMPLATE_FILE).exists():
        (out_dir / contract.CHAT_TEMPLATE_FILE).write_text(template)
    if not (out_dir / contract.TOKENIZER_FILE).exists():
        raise EdgeCompressError(f"the tokenizer has no fast ({contract.TOKENIZER_FILE}) form; the artifact needs one")
    return sorted(p.name for p in out_dir.iterdir())


def set_genai_custom_ops_library(out_dir: Path, library: str | None) -> None:
    """Name our custom-op library in genai_config.json's decoder session options (None: no entry).

    onnxruntime-genai 0.18 reads `model.decoder.session_options.custom_ops_library`; a relative path is
    taken from the config's folder (tested: tests/test_build_custom_ops.py), so the folder can move."""
    path = out_dir / contract.GENAI_CONFIG_FILE
    genai = json.loads(path.read_text())
    options = genai["model"]["decoder"]["session_options"]
    if library is None and "custom_ops_library" not in options:
        return
    if library is None:
        options.pop("custom_ops_library")
    else:
        options["custom_ops_library"] = library
    path.write_text(json.dumps(genai, indent=2) + "\n")


def set_genai_share_buffer(out_dir: Path, shared: bool) -> None:
    """genai_config's search.past_present_share_buffer: true when the graph may write its cache in place
    (contract.SHARED_KV_BUFFER); onnxruntime-genai then preallocates a max_length cache."""
    path = out_dir / contract.GENAI_CONFIG_FILE
    genai = json.loads(path.read_text())
    if genai["search"].get("past_present_share_buffer") == shared:
        return
    genai["search"]["past_present_share_buffer"] = shared
    path.write_text(json.dumps(genai, indent=2) + "\n")


# Rotary types whose frequencies depend on the sequence length at run time: no fixed cos/sin cache.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# The caches cover at least this many positions: the export's own rotary works at any position, so a model with a
# short nominal context (max_position_embeddings) keeps running longer windows (the build's 512-token evaluation).
MIN_ROTARY_POSITIONS = 4096


def rotary_caches(model: Any):
    """The model's own rotary cos/sin for positions 0..max(max_position_embeddings, MIN_ROTARY_POSITIONS)-1 as
    GroupQueryAttention's caches ([positions, D/2] float32, attention scaling applied), or None where they cannot
    be fixed: no
    `model.model.rotary_emb`, a length-dependent rope type, or halves that do not repeat (not half-split)."""
    import torch

    from edgecompress.passes.fuse_group_query_attention import RotaryCaches

    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") in _LENGTH_DEPENDENT_ROPE:
        return None
    positions = max(int(getattr(model.config, "max_position_embeddings", 0) or 0), MIN_ROTARY_POSITIONS)
    with torch.no_grad():
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(probe, torch.arange(positions)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = cos.shape[-1] // 2
    if cos.shape[-1] % 2 or not (np.array_equal(cos[:, :half], cos[:, half:])
                                  and np.array_equal(sin[:, :half], sin[:, half:])):
        return None
    return RotaryCaches(np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half]))
