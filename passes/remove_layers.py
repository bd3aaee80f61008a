"""Remove whole decoder layers: the residual stream skips them and their KV cache slots go away."""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgecompress.contract import KV_NAMES
from edgecompress.passes.graph_edits import StatsResult, check_no_dangling_values, require_unfused
from edgecompress.passes.layer_map import (
    CLASS_HIERARCHY_KEY,
    NAME_SCOPES_KEY,
    DecoderLayer,
    LayerMap,
    PassInputError,
    build_layer_map,
    module_stack,
)


@dataclasses.dataclass
class RemoveLayersStats:
    layers_removed: int = 0
    nodes_removed: int = 0
    kv_inputs_removed: int = 0
    kv_outputs_removed: int = 0


class RemoveLayersPass(ir.passes.InPlacePass):
    """Bypass and delete the given decoder layers, then renumber the KV cache inputs/outputs.

    `kv_names` overrides the artifact contract's KV names (onnxruntime-genai's, `contract.KV_NAMES`)."""

    def __init__(self, layers: list[int], kv_names: dict[str, str] | None = None):
        super().__init__()
        self.layers = sorted(set(layers))
        self.kv_names = {**KV_NAMES, **(kv_names or {})}

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)  # the layer map reads the export's KV Concat nodes
        layer_map = build_layer_map(model.graph)
        unknown = [index for index in self.layers if index not in layer_map.layers]
        if unknown:
            raise PassInputError(
                f"cannot remove layers {unknown}: the model has decoder layers {list(layer_map.layers)}"
            )
        if len(self.layers) >= layer_map.num_layers:
            raise PassInputError(f"cannot remove all {layer_map.num_layers} decoder layers")
        _check_kv_names(model.graph, layer_map, self.kv_names)

    def call(self, model: ir.Model) -> StatsResult:
        stats = RemoveLayersStats()
        if not self.layers:
            return StatsResult(model, modified=False, stats=stats)
        graph = model.graph
        nodes_before = len(graph)
        layer_map = build_layer_map(graph)
        kept = [index for index in layer_map.layers if index not in self.layers]
        first_kept = layer_map.layers[kept[0]]
        # Descending, so a removed layer feeding another removed layer is already bypassed.
        for index in reversed(self.layers):
            self._remove_layer(graph, layer_map.layers[index], first_kept, stats)
        RemoveUnusedNodesPass()(model)
        self._renumber_kv(graph, [layer_map.layers[index] for index in kept])
        stats.layers_removed = len(self.layers)
        stats.nodes_removed = nodes_before - len(graph)
        return StatsResult(model, modified=True, stats=stats)

    def ensures(self, model: ir.Model) -> None:
        layer_map = build_layer_map(model.graph)
        _check_kv_names(model.graph, layer_map, self.kv_names)
        check_no_dangling_values(model.graph)

    def _remove_layer(
        self, graph: ir.Graph, layer: DecoderLayer, donor: DecoderLayer, stats: RemoveLayersStats
    ) -> None:
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
            stats.kv_outputs_removed += 1

        removable = _nodes_only_used_inside(layer.nodes)
        graph.remove(removable, safe=True)
        for past in layer.past_inputs.values():
            graph.inputs.remove(past)
            stats.kv_inputs_removed += 1
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
