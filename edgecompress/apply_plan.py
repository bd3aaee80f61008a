"""Apply a CompressionPlan to a Hugging Face torch model in place.

The result is the PyTorch reference the compressed ONNX export must match: replaced Linears become
two thin Linears (x @ Aᵀ, then @ Bᵀ + bias), or the MonarchLinear / BlastLinear modules computing what the
export's MonarchMatMul / BlastMatMul nodes compute (so verification compares like with like), removed decoder layers are deleted and the remaining
ones renumbered so the KV cache keeps one slot per remaining layer. A factored tied embedding replaces
embed_tokens and lm_head by one FactoredEmbedding (what FactorEmbeddingPass's graph computes).
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.attribution.embedding import install_factored_embedding, tied_embedding
from edgecompress.attribution.layer_walker import decoder_layers
from edgecompress.attribution.structured import install_structured
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import CompressionPlan, model_weights_hash


def remove_layers(model, indices) -> None:
    """Delete decoder layers and renumber the rest (attention `layer_idx`, config)."""
    layers = decoder_layers(model)
    doomed = sorted(set(indices))
    if any(not 0 <= i < len(layers) for i in doomed):
        raise EdgeCompressError(f"cannot remove layers {doomed}: the model has {len(layers)}")
    kept = [layer for i, layer in enumerate(layers) if i not in doomed]
    model.model.layers = nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [kind for i, kind in enumerate(layer_types) if i not in doomed]
    config.num_hidden_layers = len(kept)


def _check_shapes(model, plan: CompressionPlan) -> None:
    n_layers = len(decoder_layers(model))
    if plan.model.get("num_hidden_layers", n_layers) != n_layers or len(plan.layers) != n_layers:
        raise EdgeCompressError(f"plan is for a model with {len(plan.layers)} layers, this one has {n_layers}")
    for linear in plan.low_rank_linears():
        try:
            module = model.get_submodule(linear.module)
        except AttributeError as exc:
            raise EdgeCompressError(f"plan names {linear.module}, which this model does not have") from exc
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != (
            linear.out_features,
            linear.in_features,
        ):
            raise EdgeCompressError(f"plan's {linear.module} does not match this model's module")
    if plan.embedding is not None:
        embed_name, head_name, weight = tied_embedding(model)
        wanted = (plan.embedding.module, plan.embedding.head, plan.embedding.vocab, plan.embedding.hidden)
        if (embed_name, head_name, *weight.shape) != wanted:
            raise EdgeCompressError(f"plan's factored embedding {plan.embedding.module} [{plan.embedding.vocab}, "
                                    f"{plan.embedding.hidden}] does not match this model's {embed_name} "
                                    f"{list(weight.shape)}")


@torch.no_grad()
def apply_plan(model, plan: CompressionPlan, check_hash: bool = True):
    """Apply `plan` to `model` in place and return it. With `check_hash`, the model's weights must
    be the ones the plan was made from."""
    if check_hash:
        plan.verify_hash(model_weights_hash(model))
    _check_shapes(model, plan)
    plan.validate()
    for linear in plan.low_rank_linears():
        factors = {part: plan.factors[f"{linear.module}.{part}"] for part in linear.factor_names}
        bias = plan.factors.get(f"{linear.module}.bias") if linear.has_bias else None
        install_structured(model, linear.module, linear.structure, factors, bias)
    if plan.embedding is not None:
        install_factored_embedding(model, plan.factors)
    if plan.removed_layers:
        remove_layers(model, plan.removed_layers)
    return model
