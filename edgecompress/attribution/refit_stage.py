"""The refit stage of a method: train the chosen layers' factors on calibration data (attribution/refit.py),
in place of the ones the plan builder holds; the model is restored afterwards.

"layer" (grasp-wr): each replaced layer matches the dense layer's output on the compressed model's hidden
states, bottom up. "end-to-end" (grasp-wre): all replaced layers jointly match the dense model's final normed
hidden states, or its logits (loss "kl"), early-stopped on the calibration's held-out windows when it has
them. "layer" then "end-to-end": the first as the second's start.
"""

from __future__ import annotations

import torch

from edgecompress.attribution.layer_walker import LayerWalker, record_stream, set_submodule
from edgecompress.attribution.plan_state import PlanState
from edgecompress.attribution.structured import install_structured


def _layer_targets(walker, chosen):
    """Each chosen layer's dense output on its dense input, per batch (before any factor is installed); kept in
    float16 when there are many windows (8 layers x 128 windows: 0.6 GB instead of 1.2)."""
    half = walker.n_batches > 32
    with torch.no_grad():
        inputs = walker.dense_inputs(chosen)
        return {index: [_target(walker.run_layer(index, h, batch), half) for batch, h in enumerate(inputs[index])]
                for index in chosen}


def _target(hidden: torch.Tensor, half: bool) -> torch.Tensor:
    return hidden.half() if half and float(hidden.abs().max()) < 6e4 else hidden


def _end_to_end_objective(walker, chosen, loss):
    """The dense model's final normed states from the lowest chosen layer up, as a refit Objective
    (built before any factor is installed: the layers below stay dense, so the start inputs stay valid)."""
    from edgecompress.attribution.refit import Objective

    start = min(chosen)
    with torch.no_grad():
        _, inputs = next(walker.inputs([start], dense=True))
        targets = walker.stream.final_states  # recorded with the stream (the same dense model)
        if not targets:
            targets = [walker.final_states(h, batch, start) for batch, h in enumerate(inputs)]
    return Objective(walker, start, inputs, targets, loss)


def _holdout_walker(model, calib, batch_size: int):
    if calib.holdout_ids is None:
        return None
    stream = record_stream(model, calib.holdout_ids.to(next(model.parameters()).device), batch_size)
    return LayerWalker(model, stream)


def _install_builder_factors(model, builder, chosen) -> dict:
    installed = {}
    for index in chosen:
        for record in builder.linears[index]:
            key = record.module
            bias = builder.factors.get(f"{key}.bias")
            bias = None if bias is None else torch.as_tensor(bias)
            factors = {part: builder.factors[f"{key}.{part}"] for part in record.factor_names}
            installed[key] = install_structured(model, key, record.structure, factors, bias)
    return installed


def _install_factored_head(model, builder, installed: dict) -> None:
    """The end-to-end refit sees the factored head (the layers learn around its error; the table's own
    factors stay as fitted: they also serve the lookup, which starts below the refit)."""
    from edgecompress.attribution.embedding import install_factored_embedding

    installed.update(install_factored_embedding(model, builder.factors))
    for parameter in model.get_input_embeddings().parameters():
        parameter.requires_grad_(False)


def refit_factors(state: PlanState) -> None:
    """Run the method's refit scopes in order; the trained factors replace the builder's, and the refit's
    losses go into the plan's scores ("refit")."""
    from edgecompress.attribution.refit import refit_end_to_end, refit_layers

    model, walker, chosen, refit, options = state.model, state.walker, state.chosen, state.method.refit, state.options
    layer_targets = _layer_targets(walker, chosen) if "layer" in refit.scopes else None
    objective = holdout = None
    if "end-to-end" in refit.scopes:
        objective = _end_to_end_objective(walker, chosen, refit.loss)
        holdout_walker = _holdout_walker(model, state.calib, options.batch_size)
        if holdout_walker is not None:
            holdout = _end_to_end_objective(holdout_walker, chosen, refit.loss)
    installed = _install_builder_factors(model, state.builder, chosen)
    if state.embedding is not None and objective is not None:
        _install_factored_head(model, state.builder, installed)
    report = {}
    try:
        if layer_targets is not None:
            layers = refit_layers(walker, chosen, layer_targets, options.refit_layer_steps, options.refit_layer_lr,
                                  progress=state.report)
            report["layer"] = {str(index): values for index, values in layers.items()}
            del layer_targets
        if objective is not None:
            report["end-to-end"] = refit_end_to_end(
                walker, chosen, objective.start_inputs, objective.final_targets, options.refit_steps,
                options.refit_lr, progress=state.report, loss=refit.loss, holdout=holdout)
        _keep_trained(model, state.builder, installed)
    finally:
        for key, original in installed.items():
            set_submodule(model, key, original)
    state.plan_scores["refit"] = report if len(refit.scopes) > 1 else report[refit.scopes[0]]


def _keep_trained(model, builder, installed: dict) -> None:
    """Copy the trained factors back into the builder (the factored head trained nothing)."""
    for key in installed:
        module = model.get_submodule(key)
        if not hasattr(module, "plan_factors") and not hasattr(module, "a"):
            continue
        trained = module.plan_factors() if hasattr(module, "plan_factors") else {"A": module.a.weight, "B": module.b.weight}
        for part, tensor in trained.items():
            builder.factors[f"{key}.{part}"] = tensor.detach().float().cpu().numpy().copy()
