"""Remove whole decoder layers: the residual stream skips them and their KV cache slots go away."""

from __future__ import annotations

import copy
import dataclasses
import re

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgecompress.passes.layer_map import (
    CLASS_HIERARCHY_KEY,
    NAME_SCOPES_KEY,
    DecoderLayer,
    LayerMap,
    PassInputError,
    build_layer_map,
    module_stack,
)

# onnxruntime-genai naming (genai_config.json `inputs.past_key_names` and friends).
DEFAULT_KV_NAMES = {
    "past_key": "past_key_values.%d.key",
    "past_value": "past_key_values.%d.value",
    "present_key": "present.%d.key",
    "present_value": "present.%d.value",
}


@dataclasses.dataclass
class RemoveLayersStats:
    layers_removed: int = 0
    nodes_removed: int = 0
    kv_inputs_removed: int = 0
    kv_outputs_removed: int = 0


class RemoveLayersPass(ir.passes.InPlacePass):
    """Bypass and delete the given decoder layers, then renumber the KV cache inputs/outputs."""

    def __init__(self, layers: list[int], kv_names: dict[str, str] | None = None):
        super().__init__()
        self.layers = sorted(set(layers))
        self.kv_names = {**DEFAULT_KV_NAMES, **(kv_names or {})}
        self.stats = RemoveLayersStats()

    def requires(self, model: ir.Model) -> None:
        layer_map = build_layer_map(model.graph)
        unknown = [index for index in self.layers if index not in layer_map.layers]
        if unknown:
            raise PassInputError(
                f"cannot remove layers {unknown}: the model has decoder layers {list(layer_map.layers)}"
            )
        if len(self.layers) >= layer_map.num_layers:
            raise PassInputError(f"cannot remove all {layer_map.num_layers} decoder layers")
        _check_kv_names(model.graph, layer_map, self.kv_names)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = RemoveLayersStats()
        if not self.layers:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        nodes_before = len(graph)
        layer_map = build_layer_map(graph)
        kept = [index for index in layer_map.layers if index not in self.layers]
        first_kept = layer_map.layers[kept[0]]
        # Descending, so a removed layer feeding another removed layer is already bypassed.
        for index in reversed(self.layers):
            self._remove_layer(graph, layer_map.layers[index], first_kept)
        RemoveUnusedNodesPass()(model)
        self._renumber_kv(graph, [layer_map.layers[index] for index in kept])
        self.stats.layers_removed = len(self.layers)
        self.stats.nodes_removed = nodes_before - len(graph)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        layer_map = build_layer_map(model.graph)
        _check_kv_names(model.graph, layer_map, self.kv_names)
        _check_no_dangling_values(model.graph)

    def _remove_layer(self, graph: ir.Graph, layer: DecoderLayer, donor: DecoderLayer) -> None:
        if layer.residual_output.is_graph_output():
            raise PassInputError(f"decoder layer {layer.index} output is a graph output; cannot bypass it")
        ir.convenience.replace_all_uses_with(layer.residual_output, layer.residual_input)

        node_set = set(layer.nodes)
        for kind, past in layer.past_inputs.items():
            # Nodes outside the layer may read the cache's shape (past length for the mask);
            # every layer's cache has the same shape, so a kept layer's input serves as well.
            for use in list(past.uses()):
                if use.node not in node_set:
                    use.node.replace_input_with(use.idx, donor.past_inputs[kind])
        for present in layer.present_outputs.values():
            graph.outputs.remove(present)
            self.stats.kv_outputs_removed += 1

        removable = _nodes_only_used_inside(layer.nodes)
        graph.remove(removable, safe=True)
        for past in layer.past_inputs.values():
            graph.inputs.remove(past)
            self.stats.kv_inputs_removed += 1
        # What is left of the layer's scope is computation shared with other layers (CSE of
        # shapes, rotary cos/sin, the mask): it no longer belongs to a layer that exists.
        for node in layer.nodes:
            if node.graph is graph:
                _move_out_of_layer(node, layer.scope)

    def _renumber_kv(self, graph: ir.Graph, kept: list[DecoderLayer]) -> None:
        # Ascending order: a layer's new index never exceeds its old one, so every target name
        # is already free (removed or renamed) when it is taken.
        for new_index, layer in enumerate(kept):
            for kind, value in layer.past_inputs.items():
                value.name = self.kv_names[f"past_{kind}"] % new_index
            for kind, value in layer.present_outputs.items():
                value.name = self.kv_names[f"present_{kind}"] % new_index


def _nodes_only_used_inside(nodes: list[ir.Node]) -> list[ir.Node]:
    """The subset of `nodes` whose results are used by nothing outside that subset."""
    removable = set(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(removable):
            for value in node.outputs:
                if value.is_graph_output() or any(use.node not in removable for use in value.uses()):
                    removable.discard(node)
                    changed = True
                    break
    return [node for node in nodes if node in removable]


def _move_out_of_layer(node: ir.Node, layer_scope: str) -> None:
    stack = module_stack(node)
    if stack is None or layer_scope not in stack.scopes:
        return
    depth = stack.scopes.index(layer_scope)
    scopes = list(stack.scopes[:depth]) + ["shared"]
    classes = list(stack.classes[:depth]) + ["edgecompress.shared"]
    node.metadata_props[NAME_SCOPES_KEY] = repr(scopes)
    node.metadata_props[CLASS_HIERARCHY_KEY] = repr(classes)


def _check_kv_names(graph: ir.Graph, layer_map: LayerMap, kv_names: dict[str, str]) -> None:
    """Each layer owns one past/present key/value, named with contiguous indices 0..L-1."""
    for position, layer in enumerate(layer_map.layers.values()):
        for kind in ("key", "value"):
            for role, values in (("past", layer.past_inputs), ("present", layer.present_outputs)):
                expected = kv_names[f"{role}_{kind}"] % position
                actual = values[kind].name if kind in values else None
                if actual != expected:
                    raise PassInputError(
                        f"decoder layer {layer.index}: expected KV {role} {kind} {expected!r}, found {actual!r}"
                    )
    for role_kind, template in kv_names.items():
        pattern = re.compile(re.escape(template).replace("%d", r"(\d+)"))
        values = graph.inputs if role_kind.startswith("past") else graph.outputs
        indices = sorted(int(m.group(1)) for v in values if (m := pattern.fullmatch(v.name or "")))
        if indices != list(range(layer_map.num_layers)):
            raise PassInputError(f"KV names {template!r} are not contiguous 0..{layer_map.num_layers - 1}")


def _check_no_dangling_values(graph: ir.Graph) -> None:
    def is_available(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is not None:
            return producer.graph is graph
        return value.is_graph_input() or value.is_initializer()

    for node in graph:
        for value in node.inputs:
            if value is not None and not is_available(value):
                raise ir.passes.PostconditionError(f"node {node.name!r} reads dangling value {value.name!r}")
    for value in graph.outputs:
        if not is_available(value):
            raise ir.passes.PostconditionError(f"graph output {value.name!r} is dangling")


def genai_config_with_layers(config: dict, num_hidden_layers: int) -> dict:
    """A copy of an onnxruntime-genai `genai_config.json` dict for a model with fewer layers."""
    updated = copy.deepcopy(config)
    try:
        updated["model"]["decoder"]["num_hidden_layers"] = num_hidden_layers
    except (KeyError, TypeError) as error:
        raise PassInputError("genai_config has no model.decoder section") from error
    return updated
