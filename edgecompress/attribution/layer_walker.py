"""Walk a decoder model layer by layer on calibration data: llm-compressor's sequential pipeline
without tracing, and the one place that runs decoder layers for attribution and refits.

One recorded forward pass (`record_stream`) keeps, per calibration batch, the input of layer 0 and
the keyword arguments every decoder layer was called with (mask, rotary embeddings, positions) — and,
when it fits, every layer's input: the one cache of dense layer inputs. `LayerWalker.inputs(wanted)`
then yields, upward, the hidden states entering each wanted layer: from that cache while the model
below is still dense, else by running the layers in between as they are *now*, so a caller that
compresses a layer after receiving its inputs feeds the layers above with the compressed model's
states. Attribution never re-implements attention and never re-runs the layers below the one it studies.

Where a layer's weights live while it runs is one replaceable piece, the `Placement`: the default keeps
everything where it is (models that fit); a 7B-70B build swaps in one that onloads a layer from CPU or
disk for the duration of `use` and offloads it after, and keeps cached activations off the GPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

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
    layer_inputs: list[list[torch.Tensor]] | None = None  # per batch, per layer: the dense cache, when kept
    final_states: list[torch.Tensor] | None = None  # per batch: the dense final normed state (what the head reads)
    cached: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> dense input per batch (cache_dense)

    @property
    def n_batches(self) -> int:
        return len(self.input_ids)

    def keep_only(self, wanted, dtype: torch.dtype) -> None:
        """Drop the full per-layer cache, keeping the wanted layers' inputs (in `dtype`) as `cached`."""
        if self.layer_inputs is None:
            return
        wanted = sorted(set(wanted))
        for per_batch in self.layer_inputs:  # drop the rest first: the peak stays the half-precision cache
            per_batch[:] = [h if index in wanted else None for index, h in enumerate(per_batch)]
        for index in wanted:
            self.cached[index] = [per_batch[index].to(dtype) for per_batch in self.layer_inputs]
            for per_batch in self.layer_inputs:
                per_batch[index] = None
        self.layer_inputs = None


def calibration_batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


class Placement:
    """Where decoder layers and cached activations live. This one: wherever they already are."""

    @contextmanager
    def use(self, layer: nn.Module) -> Iterator[nn.Module]:
        """The layer, ready to run on the compute device, for the duration of the block. Another
        placement moves it in place (the same module object: hooks and swapped Linears stay on it)."""
        yield layer

    def store(self, hidden: torch.Tensor) -> torch.Tensor:
        """Where a cached activation is kept (another placement may move it to CPU or disk)."""
        return hidden


def _stored(hidden: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`hidden` in the cache's dtype, unless float16 would overflow it (a large residual stream stays as is)."""
    if dtype is None or (dtype == torch.float16 and float(hidden.abs().max()) > 6e4):
        return hidden
    return hidden.to(dtype)


@torch.no_grad()
def record_stream(
    model, input_ids: torch.Tensor, batch_size: int = 1, on_layer=None, progress=None, keep_inputs: bool = False,
    placement: Placement | None = None, keep_dtype: torch.dtype | None = None,
) -> LayerStream:
    """One forward pass over `input_ids`; `on_layer(index, h_in, h_out)` sees every layer.
    With `keep_inputs`, every layer's input is kept too (memory: L x n x T x d values), which
    saves re-running the lower layers later; `keep_dtype` stores them in another dtype (float16 halves the
    cache; `LayerStream.keep_only` turns the wanted layers back into the compute dtype)."""
    placement = placement or Placement()
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
                current["kept"].append(placement.store(_stored(hidden.detach(), keep_dtype)))

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
    stream = LayerStream([], [], [], [] if keep_inputs else None, [])
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model  # no LM head: nothing reads logits
    batches = calibration_batches(input_ids, batch_size)
    try:
        for number, batch in enumerate(batches):
            current.update(kwargs={}, inputs={}, kept=[])
            batch = batch.to(device)
            output = base(input_ids=batch, use_cache=False)
            stream.final_states.append(output.last_hidden_state.detach())
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


class LayerWalker:
    """Runs the decoder layers of `model` on the recorded calibration batches of `stream`."""

    def __init__(self, model, stream: LayerStream, placement: Placement | None = None):
        self.model, self.stream = model, stream
        self.placement = placement or Placement()

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def n_batches(self) -> int:
        return self.stream.n_batches

    def run(self, hidden: torch.Tensor, batch: int, start: int, stop: int) -> torch.Tensor:
        """Layers start..stop-1 of the model as it is now, on batch `batch` entering layer `start`."""
        kwargs = self.stream.layer_kwargs[batch]
        for index in range(start, stop):
            with self.placement.use(self.layers[index]) as layer:
                hidden = layer_output(layer(hidden, **kwargs[index]))
        return hidden

    def run_layer(self, index: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        return self.run(hidden, batch, index, index + 1)

    def inputs(self, wanted, dense: bool = False) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(index, input of that layer per batch) for each wanted layer, lowest first.

        dense=True promises the layers below are unchanged, so the dense cache serves when it was kept;
        otherwise the walk runs the model as it is when it advances, changes made since included."""
        wanted = sorted(set(wanted))
        if dense and self.stream.layer_inputs is not None:
            for index in wanted:
                yield index, [per_batch[index] for per_batch in self.stream.layer_inputs]
            return
        if dense and wanted and all(index in self.stream.cached for index in wanted):
            for index in wanted:
                yield index, self.stream.cached[index]
            return
        hidden, position = list(self.stream.embeddings), 0
        if wanted and wanted[0] in self.stream.cached:
            # Start from the dense input of the lowest wanted layer: every method changes only the layers it
            # chose, none below the lowest of them, so the layers below are still dense.
            hidden, position = list(self.stream.cached[wanted[0]]), wanted[0]
        elif wanted and self.stream.layer_inputs is not None:
            hidden, position = [per_batch[wanted[0]] for per_batch in self.stream.layer_inputs], wanted[0]
        for index in wanted:
            with torch.no_grad():
                hidden = [self.run(h, batch, position, index) for batch, h in enumerate(hidden)]
            position = index
            yield index, hidden

    @torch.no_grad()
    def cache_dense(self, wanted) -> None:
        """Keep the dense input of each wanted layer (one pass up to the highest), so later walks start there
        instead of at the embeddings: call it before any wanted layer is changed."""
        wanted = sorted(set(wanted) - set(self.stream.cached))
        if wanted:
            self.stream.cached.update(dict(self.inputs(wanted, dense=True)))

    def dense_inputs(self, wanted) -> dict[int, list[torch.Tensor]]:
        """Every wanted layer's dense input at once (call it before any of them is changed)."""
        return dict(self.inputs(wanted, dense=True))

    def next_token_loss(self, hidden: torch.Tensor, batch: int, start: int) -> torch.Tensor:
        """Mean next-token cross-entropy, running the model from layer `start` (input `hidden`) up.
        Labels are shifted once here (fixing GRASP's double shift, bug B1)."""
        hidden = self.run(hidden, batch, start, len(self.layers))
        logits = self.model.get_output_embeddings()(self.model.model.norm(hidden))
        input_ids = self.stream.input_ids[batch]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))

    def final_states(self, hidden: torch.Tensor, batch: int, start: int) -> torch.Tensor:
        """The final normed hidden state (what the LM head reads), from layer `start` up."""
        return self.model.model.norm(self.run(hidden, batch, start, len(self.layers)))
