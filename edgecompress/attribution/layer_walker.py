"""Run a decoder model layer by layer on calibration data.

One full forward pass records, per calibration batch, the input of layer 0 and the keyword
arguments every decoder layer was called with (mask, rotary embeddings, positions). Afterwards any
layer's input can be rebuilt by stepping through the original layers, and the loss can be computed
from any layer up, so attribution never re-runs the layers below the one it studies and never
re-implements attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEAR_NAMES = ATTENTION_LINEARS + MLP_LINEARS


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def layer_prefix(model) -> str:
    """Module name of the decoder layer list, e.g. "model.layers"."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("decoder layers are not a submodule of the model")


def layer_linears(layer: nn.Module, names=LINEAR_NAMES) -> dict[str, nn.Linear]:
    """The projections of one decoder layer that exist and are plain Linear modules."""
    found = {}
    for name in names:
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            found[name] = module
    return found


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace root.<name> by `module` and return what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    previous = getattr(parent, child)
    setattr(parent, child, module)
    return previous


def layer_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_hidden_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class LayerStream:
    """What one recorded forward pass leaves behind, per calibration batch."""

    input_ids: list[torch.Tensor]  # [b, T] per batch
    embeddings: list[torch.Tensor]  # input of layer 0, [b, T, d] per batch
    layer_kwargs: list[list[dict]]  # per batch, per layer: kwargs of the layer call
    layer_inputs: list[list[torch.Tensor]] | None = None  # per batch, per layer, when cached

    @property
    def n_batches(self) -> int:
        return len(self.input_ids)


def calibration_batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


@torch.no_grad()
def record_stream(
    model, input_ids: torch.Tensor, batch_size: int = 1, on_layer=None, progress=None, keep_inputs: bool = False
) -> LayerStream:
    """One forward pass over `input_ids`; `on_layer(index, h_in, h_out)` sees every layer.
    With `keep_inputs`, every layer's input is kept too (memory: L x n x T x d values), which
    saves re-running the lower layers later."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    current: dict = {}
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            hidden = layer_hidden_input(args, kwargs)
            if index == 0:
                current["embeddings"] = hidden.detach()
            current["kwargs"][index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            current["inputs"][index] = hidden
            if keep_inputs:
                current["kept"].append(hidden.detach())

        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            if on_layer is not None:
                on_layer(index, current["inputs"][index], layer_output(output))
            current["inputs"].pop(index, None)

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(index), with_kwargs=True))
    stream = LayerStream([], [], [], [] if keep_inputs else None)
    batches = calibration_batches(input_ids, batch_size)
    try:
        for number, batch in enumerate(batches):
            current.update(kwargs={}, inputs={}, kept=[])
            batch = batch.to(device)
            model(input_ids=batch, use_cache=False)
            stream.input_ids.append(batch)
            stream.embeddings.append(current["embeddings"])
            stream.layer_kwargs.append([current["kwargs"][i] for i in range(len(layers))])
            if keep_inputs:
                stream.layer_inputs.append(current["kept"])
            if progress is not None:
                progress("forward", number + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    return stream


def run_layers(model, hidden: torch.Tensor, layer_kwargs: list[dict], start: int, stop: int) -> torch.Tensor:
    """Apply decoder layers start..stop-1 to `hidden` with their recorded call kwargs."""
    layers = decoder_layers(model)
    for index in range(start, stop):
        hidden = layer_output(layers[index](hidden, **layer_kwargs[index]))
    return hidden


@torch.no_grad()
def inputs_of_layers(model, stream: LayerStream, wanted: list[int]) -> dict[int, list[torch.Tensor]]:
    """Input hidden states of each wanted layer in the dense model, per batch: from the cache, or
    by stepping from the embeddings through the layers (call it before any of them is changed)."""
    wanted = sorted(set(wanted))
    if stream.layer_inputs is not None:
        return {index: [per_batch[index] for per_batch in stream.layer_inputs] for index in wanted}
    result = {index: [] for index in wanted}
    for batch in range(stream.n_batches):
        hidden, position = stream.embeddings[batch], 0
        for index in wanted:
            hidden = run_layers(model, hidden, stream.layer_kwargs[batch], position, index)
            position = index
            result[index].append(hidden)
    return result


def next_token_loss(model, hidden: torch.Tensor, input_ids: torch.Tensor, layer_kwargs: list[dict], start: int):
    """Mean next-token cross-entropy, running the model from layer `start` (input `hidden`) up.
    Labels are shifted once here (fixing GRASP's double shift, bug B1)."""
    hidden = run_layers(model, hidden, layer_kwargs, start, len(decoder_layers(model)))
    logits = model.get_output_embeddings()(model.model.norm(hidden))
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
    )
