"""The layer stages of a method: score the decoder layers on the calibration data, choose the ones to replace or
remove for the ratio, keep the chosen layers' inputs for the stages after, or remove the chosen layers."""

from __future__ import annotations

import torch

from edgecompress.attribution.block_influence import LayerScores, layer_scores
from edgecompress.attribution.layer_walker import LayerWalker, decoder_layers, layer_linears
from edgecompress.attribution.plan_state import PlanState, linear_params
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import count_for_ratio, uniform_rho_for_ratio

# Keep every layer's calibration input from the scoring pass when it fits in this many bytes
# (16 x 512 tokens of a 30-layer d=576 model: 0.6 GB); above it, in float16 when that fits (128 windows:
# 2.3 GB), until the layers are chosen: then only the chosen layers' inputs stay, in float32 (8 layers x
# 128 x 512 tokens: 1.2 GB, at most CHOSEN_INPUT_CACHE_BYTES); else they are recomputed once, after choosing.
LAYER_INPUT_CACHE_BYTES = 1 << 30
HALF_INPUT_CACHE_BYTES = 5 << 29
CHOSEN_INPUT_CACHE_BYTES = 2 << 30


def score_layers(state: PlanState) -> None:
    """One recorded forward pass (BI, angular states, the layer stream), unless the method needs no data;
    every layer's input is cached when it fits (LAYER_INPUT_CACHE_BYTES)."""
    method, model = state.method, state.model
    replace = method.factors is not None
    if method.layers.scope == "all" and replace and method.factors.basis == "weight":
        return  # plain SVD of every Linear: no data needed
    input_ids = state.calib.input_ids.to(next(model.parameters()).device)
    stream_bytes = input_ids.numel() * model.config.hidden_size * 4 * len(decoder_layers(model))
    full = stream_bytes <= LAYER_INPUT_CACHE_BYTES
    half = not full and replace and method.layers.scope == "chosen" and stream_bytes // 2 <= HALF_INPUT_CACHE_BYTES
    state.scores = layer_scores(
        model, input_ids, state.options.batch_size,
        progress=lambda s, d, t: state.report("layer scores", d, t),
        keep_inputs=replace and (full or half), keep_dtype=torch.float16 if half else None,
    )
    state.walker = LayerWalker(model, state.scores.stream)


def layer_saving(layer, state: PlanState) -> int:
    """Parameters saved by replacing (or removing) one decoder layer."""
    if state.method.factors is None:
        return sum(p.numel() for p in layer.parameters())
    options = state.options
    return sum(
        lin.out_features * lin.in_features - linear_params(lin, state.rho, options.structure, options.blocks)[1]
        for lin in layer_linears(layer).values()
    )


def choose_layers(state: PlanState) -> None:
    """Which decoder layers to replace or remove: every one (with the one rho that reaches the ratio), or the
    lowest-scored by BI (independent) or angular distance (contiguous) for what is left of the ratio."""
    layers = decoder_layers(state.model)
    if state.method.layers.scope == "all":
        state.chosen = list(range(len(layers)))
        shapes = [(lin.out_features, lin.in_features) for layer in layers for lin in layer_linears(layer).values()]
        state.chosen_rho = state.rho = uniform_rho_for_ratio(shapes, state.dense_total, state.ratio)
        return
    options, action = state.options, state.method.layers.action
    ratio = state.ratio
    if state.embedding_budget is not None and ratio is not None:
        ratio -= state.embedding_budget[2] / state.dense_total  # what the tied table gives, factored later
    exclude = (len(layers) - 1,) if options.protect_last_layer else ()
    savings = [layer_saving(layer, state) for layer in layers]
    # A model needs at least one decoder layer left: removal may take all but one.
    most = len(layers) - len(exclude) - (1 if action == "remove" else 0)
    n_layers = options.n_layers
    if n_layers is not None and not 1 <= n_layers <= most:
        raise EdgeCompressError(f"cannot {action} {n_layers} of {len(layers)} decoder layers (at most {most})")
    if options.layer_selection == "bi":
        order = state.scores.lowest_bi(len(layers), exclude=exclude)[:most]
        if n_layers is None:
            n_layers = count_for_ratio([savings[i] for i in order], state.dense_total, ratio, options.rounding)
        state.chosen = sorted(order[:n_layers])
        return
    # Angular: the block size is the count whose (uniform) per-layer saving reaches the ratio.
    if n_layers is None:
        n_layers = count_for_ratio(sorted(savings)[::-1][:most], state.dense_total, ratio, options.rounding)
    state.chosen = state.scores.best_block(n_layers, exclude)
    state.plan_scores["angular_distance"] = {"block_size": len(state.chosen),
                                             "values": state.scores.angular_distances(len(state.chosen))}


def cache_chosen_inputs(state: PlanState) -> None:
    """Without the full dense cache, keep the chosen layers' dense inputs when they fit: every later stage
    (Gram matrices, refit targets, walks) then starts there instead of re-running the model from the bottom."""
    walker = state.walker
    if walker is not None and state.method.factors is not None:
        stream = walker.stream
        if stream.layer_inputs is not None and stream.layer_inputs[0][0].dtype != stream.embeddings[0].dtype:
            stream.keep_only(state.chosen, stream.embeddings[0].dtype)  # the float16 scoring cache: keep what is needed
        if stream.layer_inputs is None:
            per_layer = sum(h.numel() * h.element_size() for h in stream.embeddings)
            if per_layer * len(state.chosen) <= CHOSEN_INPUT_CACHE_BYTES:
                walker.cache_dense(state.chosen)
    state.report("chosen layers' inputs", 1, 1)


def remove_layers(state: PlanState) -> None:
    """ShortGPT's action: the chosen layers go; the plan records the parameters they held."""
    layers = decoder_layers(state.model)
    state.removed = sum(p.numel() for index in state.chosen for p in layers[index].parameters())
