"""Map an exported decoder graph onto its PyTorch modules: decoder layers and Linear layers.

The dynamo exporter stamps every node with the module stack it was traced in
(`pkg.torch.onnx.name_scopes`, e.g. ['', 'm', 'm.model', 'm.model.layers.3', ...]) and the class
of each module on that stack (`pkg.torch.onnx.class_hierarchy`). The map reads those two lists
instead of parsing node or initializer names, which the exporter's optimizer renames freely
(a Linear weight becomes `val_127`, holding Wᵀ).

Module names are made relative to the `*ForCausalLM` module, so they read like the keys of
`model.named_modules()` (`model.layers.3.self_attn.q_proj`, `lm_head`) whatever wrapper the
exporter traced.
"""

from __future__ import annotations

import ast
import dataclasses
import functools

import onnx_ir as ir

from edgecompress.errors import EdgeCompressError

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"
# Set by LowRankSplitPass on the node it inserts, so a split Linear still maps to one node.
LOW_RANK_FACTOR_KEY = "edgecompress.low_rank_factor"

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PassInputError(EdgeCompressError, ir.passes.PreconditionError):
    """Bad pass arguments or an unexpected graph: a one-line user-facing error.

    Also a PreconditionError so onnx-ir's pass infrastructure re-raises it unwrapped.
    """


@dataclasses.dataclass(frozen=True)
class ModuleStack:
    """The module stack of one node: scopes[k] is the module name at depth k, classes[k] its class."""

    scopes: tuple[str, ...]
    classes: tuple[str, ...]

    def depth_of_class(self, suffix: str) -> int | None:
        """Innermost depth whose class name ends with `suffix`."""
        for depth in range(len(self.classes) - 1, -1, -1):
            if self.classes[depth].endswith(suffix):
                return depth
        return None


@dataclasses.dataclass
class LinearSite:
    """Where one torch Linear lives in the graph."""

    module: str  # relative module name, e.g. "model.layers.0.self_attn.q_proj"
    layer: int | None  # decoder layer index, None for lm_head
    node: ir.Node  # the MatMul (or Gemm) that multiplies by the weight
    weight: ir.Value  # the initializer holding the weight
    weight_is_transposed: bool  # True when the initializer is Wᵀ [in, out] (MatMul layout)
    bias_node: ir.Node | None = None  # the Add of the bias, when the exporter kept it separate

    @property
    def in_features(self) -> int:
        shape = self.weight.shape
        return shape[0] if self.weight_is_transposed else shape[1]

    @property
    def out_features(self) -> int:
        shape = self.weight.shape
        return shape[1] if self.weight_is_transposed else shape[0]


@dataclasses.dataclass
class DecoderLayer:
    """The nodes and boundary values of one decoder layer."""

    index: int
    scope: str  # exporter scope, e.g. "m.model.layers.3"
    nodes: list[ir.Node]
    residual_input: ir.Value
    residual_output: ir.Value
    past_inputs: dict[str, ir.Value]  # "key" / "value" -> graph input
    present_outputs: dict[str, ir.Value]  # "key" / "value" -> graph output


@dataclasses.dataclass
class LayerMap:
    # By decoder layer index, ascending. Indices are the exported module names (`layers.<i>`),
    # so after RemoveLayersPass they keep their original values while KV names are renumbered.
    layers: dict[int, DecoderLayer]
    linears: dict[str, LinearSite]  # by relative module name
    # Linears whose graph form is not understood, with the reason; an error only when asked for.
    unmapped_linears: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def find_linear(self, module: str) -> LinearSite:
        """The Linear named `module`; also accepts a unique suffix match (wrapper prefixes)."""
        if module in self.linears:
            return self.linears[module]
        matches = [site for name, site in self.linears.items() if name.endswith("." + module)]
        if len(matches) == 1:
            return matches[0]
        if module in self.unmapped_linears:
            raise PassInputError(self.unmapped_linears[module])
        raise PassInputError(f"module {module!r} is not a Linear found in the ONNX graph")


def module_stack(node: ir.Node) -> ModuleStack | None:
    """The module stack of `node` from exporter metadata, without the trailing op entry."""
    scopes = node.metadata_props.get(NAME_SCOPES_KEY)
    classes = node.metadata_props.get(CLASS_HIERARCHY_KEY)
    if scopes is None or classes is None:
        return None
    return _parse_stack(scopes, classes)


@functools.lru_cache(maxsize=4096)
def _parse_stack(scopes: str, classes: str) -> ModuleStack | None:
    try:
        scope_list = ast.literal_eval(scopes)
        class_list = ast.literal_eval(classes)
    except (ValueError, SyntaxError):
        return None
    if len(scope_list) != len(class_list) or len(scope_list) < 2:
        return None
    # The last entry is the aten op itself, not a module.
    return ModuleStack(tuple(scope_list[:-1]), tuple(class_list[:-1]))


def _decoder_layer_depth(stack: ModuleStack) -> int | None:
    depth = stack.depth_of_class("DecoderLayer")
    if depth is None:
        return None
    # The layer index is the module's own name inside its ModuleList (`layers.<i>`).
    if not stack.scopes[depth].rsplit(".", 1)[-1].isdigit():
        return None
    return depth


def _root_prefix(stack: ModuleStack) -> str | None:
    depth = stack.depth_of_class("ForCausalLM")
    return None if depth is None else stack.scopes[depth]


def _relative_name(scope: str, root: str | None) -> str:
    if root and scope.startswith(root + "."):
        return scope[len(root) + 1 :]
    return scope


def module_of_class(node: ir.Node, class_suffix: str) -> str | None:
    """The relative name of the innermost module on `node`'s stack whose class ends with `class_suffix`
    (e.g. "Embedding" -> "model.embed_tokens"), or None."""
    stack = module_stack(node)
    depth = None if stack is None else stack.depth_of_class(class_suffix)
    return None if depth is None else _relative_name(stack.scopes[depth], _root_prefix(stack))


def build_layer_map(graph: ir.Graph) -> LayerMap:
    """Read the decoder layers and Linear modules of an exported graph."""
    layer_nodes: dict[int, list[ir.Node]] = {}
    layer_scopes: dict[int, str] = {}
    linear_nodes: dict[str, list[ir.Node]] = {}
    linear_layer: dict[str, int | None] = {}
    for node in graph:
        stack = module_stack(node)
        if stack is None:
            continue
        root = _root_prefix(stack)
        layer_depth = _decoder_layer_depth(stack)
        layer_index = None
        if layer_depth is not None:
            layer_index = int(stack.scopes[layer_depth].rsplit(".", 1)[-1])
            layer_nodes.setdefault(layer_index, []).append(node)
            layer_scopes[layer_index] = stack.scopes[layer_depth]
        linear_depth = stack.depth_of_class(".Linear")
        is_inserted_factor = node.metadata_props.get(LOW_RANK_FACTOR_KEY) == "A"
        if linear_depth is not None and node.op_type in ("MatMul", "Gemm") and not is_inserted_factor:
            module = _relative_name(stack.scopes[linear_depth], root)
            linear_nodes.setdefault(module, []).append(node)
            linear_layer[module] = layer_index

    linears, unmapped = {}, {}
    for module, nodes in linear_nodes.items():
        try:
            linears[module] = _linear_site(module, linear_layer[module], nodes)
        except PassInputError as error:
            unmapped[module] = str(error)
    layers = {
        index: _decoder_layer(graph, index, layer_scopes[index], layer_nodes[index])
        for index in sorted(layer_nodes)
    }
    return LayerMap(layers=layers, linears=linears, unmapped_linears=unmapped)


def constant_weight(value: ir.Value | None) -> tuple[ir.Value, bool] | None:
    """(initializer, is_transposed_view) when `value` is a 2-D weight, possibly via a 2-D Transpose."""
    if value is None:
        return None
    if value.is_initializer() and value.const_value is not None:
        return value, False
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "" and len(producer.inputs) == 1:
        source = producer.inputs[0]
        perm = producer.attributes.get_ints("perm", None)
        if (
            source is not None
            and source.is_initializer()
            and source.const_value is not None
            and len(source.shape) == 2
            and tuple(perm or (1, 0)) == (1, 0)
        ):
            return source, True
    return None


def _linear_site(module: str, layer: int | None, nodes: list[ir.Node]) -> LinearSite:
    candidates = []
    for node in nodes:
        weight = constant_weight(node.inputs[1] if len(node.inputs) > 1 else None)
        if weight is not None and len(weight[0].shape) == 2:
            candidates.append((node, *weight))
    if len(candidates) != 1:
        raise PassInputError(
            f"Linear {module!r} maps to {len(candidates)} weight matmuls in the graph, expected 1"
        )
    node, weight, via_transpose = candidates[0]
    if node.op_type == "MatMul":
        # MatMul(x, Wᵀ): a folded initializer already holds Wᵀ; a Transpose node holds W.
        is_transposed = not via_transpose
    else:
        if node.attributes.get_int("transA", 0):
            raise PassInputError(f"Linear {module!r} is a Gemm with transA=1, which is unsupported")
        trans_b = bool(node.attributes.get_int("transB", 0))
        is_transposed = trans_b == via_transpose
    return LinearSite(module, layer, node, weight, is_transposed, _bias_add(node))


def _bias_add(node: ir.Node) -> ir.Node | None:
    """The `+ bias` Add right behind a Linear's MatMul, traced in the same module scope."""
    uses = node.outputs[0].uses()
    if node.op_type != "MatMul" or len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    stack, add_stack = module_stack(node), module_stack(add)
    if stack is None or add_stack is None or stack.scopes != add_stack.scopes:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or not other.is_initializer() or len(other.shape or ()) != 1:
        return None
    return add


def _decoder_layer(graph: ir.Graph, index: int, scope: str, nodes: list[ir.Node]) -> DecoderLayer:
    node_set = set(nodes)
    residual_output = _residual_output(index, scope, nodes, node_set)
    residual_input = _residual_input(index, scope, residual_output, node_set)
    past_inputs = _past_inputs(graph, node_set)
    present_outputs = _present_outputs(graph, node_set)
    return DecoderLayer(index, scope, nodes, residual_input, residual_output, past_inputs, present_outputs)


def _is_layer_level_add(node: ir.Node | None, scope: str) -> bool:
    """An Add owned by the decoder layer module itself (`hidden = residual + ...`)."""
    if node is None or node.op_type != "Add":
        return False
    stack = module_stack(node)
    return stack is not None and stack.scopes[-1] == scope


def _residual_output(index: int, scope: str, nodes: list[ir.Node], node_set: set[ir.Node]) -> ir.Value:
    """The hidden state leaving the layer: a layer-level Add whose result is used outside it.

    Other values also leave the layer: the exporter's CSE shares shape arithmetic, rotary
    cos/sin and the attention mask computed in one layer with all later layers.
    """
    leaving = [
        value
        for node in nodes
        if _is_layer_level_add(node, scope)
        for value in node.outputs
        if value.is_graph_output() or any(use.node not in node_set for use in value.uses())
    ]
    if len(leaving) != 1:
        names = [value.name for value in leaving]
        raise PassInputError(f"decoder layer {index} has {len(leaving)} residual outputs {names}, expected 1")
    return leaving[0]


def _residual_input(index: int, scope: str, output: ir.Value, node_set: set[ir.Node]) -> ir.Value:
    """Walk the residual Add chain (Adds owned by the layer module itself) back to the layer input."""
    found: list[ir.Value] = []
    pending = [output.producer()]
    seen = set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if not _is_layer_level_add(node, scope):
            continue
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer in node_set:
                pending.append(producer)
            elif value is not None and not value.is_initializer() and value not in found:
                found.append(value)
    if len(found) != 1:
        raise PassInputError(f"decoder layer {index}: cannot find a single residual input")
    return found[0]


def _kind_of(value: ir.Value) -> str | None:
    name = value.name or ""
    if name.endswith("key"):
        return "key"
    if name.endswith("value"):
        return "value"
    return None


def _past_inputs(graph: ir.Graph, node_set: set[ir.Node]) -> dict[str, ir.Value]:
    """Graph inputs consumed by the layer's KV Concat (traced, not parsed from the name index)."""
    found = {}
    for value in graph.inputs:
        kind = _kind_of(value)
        if kind and any(node in node_set and node.op_type == "Concat" for node in _consumers(value)):
            found[kind] = value
    return found


def _consumers(value: ir.Value) -> list[ir.Node]:
    """Nodes reading `value`, looking through Identity nodes (unoptimized exports insert them)."""
    nodes = []
    for use in value.uses():
        if use.node.op_type == "Identity":
            nodes.extend(_consumers(use.node.outputs[0]))
        else:
            nodes.append(use.node)
    return nodes


def _present_outputs(graph: ir.Graph, node_set: set[ir.Node]) -> dict[str, ir.Value]:
    """Graph outputs produced inside the layer, looking through scope-less Identity nodes."""
    found = {}
    for value in graph.outputs:
        producer = value.producer()
        while producer is not None and producer not in node_set and producer.op_type == "Identity":
            producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        kind = _kind_of(value)
        if kind and producer in node_set:
            found[kind] = value
    return found
