"""Short refits of replaced layers' low-rank factors (a labelled, cheap training step).

GRASP and SVD-LLM choose each factor pair per matrix. A replaced decoder layer is then a chain of seven
low-rank Linears whose errors compound inside the layer (q/k through softmax, gate·up through SiLU),
and the layers above see inputs that already carry the error of the replaced layers below.

- `refit_layers` (grasp-wr): replaced layer by replaced layer from the bottom up, a few Adam steps on
  that layer's factors only (norms, attention and every other layer frozen) so that, fed the hidden
  states the *compressed* model produces at its input, it reproduces the hidden states the *dense*
  model has at its output. Errors from below are thus partly absorbed; memory stays one layer's
  activations.
- `refit_end_to_end` (grasp-wre): every replaced layer's factors jointly, so the model's final normed
  hidden states match the dense model's.

Calibration data only; no labels, no loss through the LM head.
"""

from __future__ import annotations

import math

import torch

from edgecompress.attribution.layer_walker import LayerWalker
from edgecompress.attribution.low_rank import factor_parameters


def _cosine_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    for group in optimizer.param_groups:  # cosine decay to zero
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def refit_layers(walker: LayerWalker, chosen: list[int], dense_outputs: dict, steps: int, lr: float,
                 progress=None) -> dict:
    """Refit the LowRankLinear factors installed in `chosen` layers in place; returns loss statistics.

    dense_outputs[index][batch]: the dense model's output hidden state of layer `index` (the target).
    """
    n_batches = walker.n_batches
    report = {}
    # The walk runs each layer as it is when it advances: the refit layers below feed the next one.
    for step_index, (index, hidden) in enumerate(walker.inputs(chosen)):
        layer = walker.layers[index]
        params = factor_parameters(layer)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        targets = dense_outputs[index]
        scale = [float(t.pow(2).mean()) for t in targets]

        def loss_on(batch: int) -> torch.Tensor:
            out = walker.run_layer(index, hidden[batch], batch)
            return (out - targets[batch]).pow(2).mean() / scale[batch]

        with torch.no_grad():
            before = sum(float(loss_on(b)) for b in range(n_batches)) / n_batches
        for step in range(steps):
            _cosine_lr(optimizer, lr, step, steps)
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


def refit_end_to_end(walker: LayerWalker, chosen: list[int], start_inputs: list, final_targets: list, steps: int,
                     lr: float, progress=None) -> dict:
    """Refit every chosen layer's factors jointly so that the model's final normed hidden states (what
    the LM head reads) match the dense model's, running from the lowest chosen layer up.

    start_inputs[batch]: the dense hidden state entering layer min(chosen) (layers below are unchanged);
    final_targets[batch]: the dense model's final normed hidden state.
    """
    start = min(chosen)
    params = [p for index in chosen for p in factor_parameters(walker.layers[index])]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    n_batches = walker.n_batches
    scale = [float(t.pow(2).mean()) for t in final_targets]

    def loss_on(batch: int) -> torch.Tensor:
        return (walker.final_states(start_inputs[batch], batch, start) - final_targets[batch]).pow(2).mean() / scale[batch]

    with torch.no_grad():
        before = sum(float(loss_on(b)) for b in range(n_batches)) / n_batches
    for step in range(steps):
        _cosine_lr(optimizer, lr, step, steps)
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
