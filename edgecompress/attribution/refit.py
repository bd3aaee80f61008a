"""Short layer-wise refit of replaced layers' low-rank factors (a labelled, cheap training step).

GRASP and SVD-LLM choose each factor pair per matrix. A replaced decoder layer is then a chain of seven
low-rank Linears whose errors compound inside the layer (q/k through softmax, gate·up through SiLU),
and the layers above see inputs that already carry the error of the replaced layers below. The refit
takes the factors as a starting point and, replaced layer by replaced layer from the bottom up, runs
a few Adam steps on that layer's factors only (norms, attention and every other layer frozen) so
that, fed the hidden states the *compressed* model produces at its input, it reproduces the hidden
states the *dense* model has at its output. Errors from below are thus partly absorbed. Calibration
data only; no labels, no loss through the LM head; memory stays one layer's activations.
"""

from __future__ import annotations

import math

import torch

from edgecompress.apply_plan import LowRankLinear
from edgecompress.attribution.layer_stream import decoder_layers, layer_output, run_layers


def _factor_parameters(layer) -> list[torch.nn.Parameter]:
    params = []
    for module in layer.modules():
        if isinstance(module, LowRankLinear):
            params += [module.a.weight, module.b.weight]
    return params


def refit_layers(model, stream, chosen: list[int], dense_outputs: dict, steps: int, lr: float, progress=None) -> dict:
    """Refit the LowRankLinear factors installed in `chosen` layers in place; returns loss statistics.

    dense_outputs[index][batch]: the dense model's output hidden state of layer `index` (the target).
    """
    layers = decoder_layers(model)
    n_batches = stream.n_batches
    hidden = [h for h in stream.embeddings]
    position = 0
    report = {}
    for step_index, index in enumerate(sorted(chosen)):
        with torch.no_grad():
            hidden = [run_layers(model, h, kw, position, index) for h, kw in zip(hidden, stream.layer_kwargs)]
        position = index
        layer = layers[index]
        params = _factor_parameters(layer)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        targets = dense_outputs[index]
        scale = [float(t.pow(2).mean()) for t in targets]

        def loss_on(batch: int) -> torch.Tensor:
            out = layer_output(layer(hidden[batch], **stream.layer_kwargs[batch][index]))
            return (out - targets[batch]).pow(2).mean() / scale[batch]

        with torch.no_grad():
            before = sum(float(loss_on(b)) for b in range(n_batches)) / n_batches
        for step in range(steps):
            for group in optimizer.param_groups:  # cosine decay to zero
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_on(step % n_batches)
            loss.backward()
            optimizer.step()
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            after = sum(float(loss_on(b)) for b in range(n_batches)) / n_batches
        report[index] = {"relative_mse_before": round(before, 6), "relative_mse_after": round(after, 6)}
        if progress is not None:
            progress(f"refit layer {index}", step_index + 1, len(chosen))
    return report


def refit_end_to_end(model, stream, chosen: list[int], start_inputs: list, final_targets: list, steps: int, lr: float,
                     progress=None) -> dict:
    """Refit every chosen layer's factors jointly so that the model's final normed hidden states (what
    the LM head reads) match the dense model's, running from the lowest chosen layer up.

    start_inputs[batch]: the dense hidden state entering layer min(chosen) (layers below are unchanged);
    final_targets[batch]: the dense model's final normed hidden state.
    """
    layers = decoder_layers(model)
    start = min(chosen)
    params = [p for index in chosen for p in _factor_parameters(layers[index])]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    n_batches = stream.n_batches
    scale = [float(t.pow(2).mean()) for t in final_targets]

    def loss_on(batch: int) -> torch.Tensor:
        hidden = run_layers(model, start_inputs[batch], stream.layer_kwargs[batch], start, len(layers))
        return (model.model.norm(hidden) - final_targets[batch]).pow(2).mean() / scale[batch]

    with torch.no_grad():
        before = sum(float(loss_on(b)) for b in range(n_batches)) / n_batches
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.zero_grad(set_to_none=True)
        loss_on(step % n_batches).backward()
        optimizer.step()
        if progress is not None:
            progress("refit", step + 1, steps)
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        after = sum(float(loss_on(b)) for b in range(n_batches)) / n_batches
    return {"final_hidden_relative_mse_before": round(before, 6), "final_hidden_relative_mse_after": round(after, 6)}
