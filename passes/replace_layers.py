"""GRASP layer replacement: some decoder layers keep low-rank Linears, others go entirely.

Composed from SplitLowRankPass, SplitStructuredPass (Linears a plan makes Monarch or BLAST) and
RemoveLayersPass. Splitting runs first, while module names
still match the plan's original layer indices; removal renumbers the KV cache afterwards.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgecompress.passes.graph_edits import StatsResult
from edgecompress.passes.layer_map import PassInputError, build_layer_map
from edgecompress.passes.remove_layers import RemoveLayersPass
from edgecompress.passes.split_low_rank import Factors, SplitLowRankPass
from edgecompress.passes.split_structured import SplitStructuredPass, StructuredFactors
from edgecompress.structures import LOWRANK, STRUCTURES


@dataclasses.dataclass
class ReplaceLayersStats:
    layers_replaced: int = 0
    layers_removed: int = 0
    matmuls_split: int = 0
    structured: dict = dataclasses.field(default_factory=dict)  # op -> Linears made Monarch / BLAST
    params_before: int = 0  # dense weights of the split Linears
    params_after: int = 0  # their factors
    nodes_removed: int = 0


class ReplaceLayersPass(ir.passes.InPlacePass):
    """Replace the Linears of `replaced` layers by their factors and delete the `removed` layers.

    `replaced` maps a decoder layer index to its factors keyed by full module name
    (`model.layers.12.self_attn.q_proj`); every module must belong to that layer.
    """

    def __init__(self, replaced: dict[int, Factors], removed: list[int] = (), kv_names: dict[str, str] | None = None,
                 structured: dict[int, StructuredFactors] | None = None):
        super().__init__()
        self.replaced = replaced
        self.removed = sorted(set(removed))
        self.kv_names = kv_names
        self.structured = structured or {}

    @classmethod
    def from_plan(cls, plan) -> ReplaceLayersPass:
        """From an `edgecompress.plan.CompressionPlan` (its `<module>.A/.B/.bias` factors, or Monarch's
        `.W1/.W2`, BLAST's `.U/.S/.V`)."""
        replaced: dict[int, Factors] = {}
        structured: dict[int, StructuredFactors] = {}
        for layer in plan.layers:
            if layer.action != "replace":
                continue
            factors = replaced.setdefault(layer.index, {})
            for linear in layer.linears:
                if STRUCTURES[getattr(linear, "structure", LOWRANK.name)].blocked:
                    arrays = tuple(plan.factors.get(f"{linear.module}.{part}") for part in linear.factor_names)
                    if any(array is None for array in arrays):
                        raise PassInputError(f"plan factors miss {linear.module}.{'/.'.join(linear.factor_names)}")
                    bias = plan.factors.get(f"{linear.module}.bias")
                    structured.setdefault(layer.index, {})[linear.module] = (linear.structure, arrays, bias)
                    continue
                arrays = tuple(plan.factors.get(f"{linear.module}.{part}") for part in ("A", "B", "bias"))
                if arrays[0] is None or arrays[1] is None:
                    raise PassInputError(f"plan factors miss {linear.module}.A/.B")
                factors[linear.module] = arrays if arrays[2] is not None else arrays[:2]
        return cls(replaced, plan.removed_layers, structured=structured)

    def requires(self, model: ir.Model) -> None:
        overlap = sorted((set(self.replaced) | set(self.structured)) & set(self.removed))
        if overlap:
            raise PassInputError(f"layers {overlap} are both replaced and removed")
        layer_map = build_layer_map(model.graph)
        unknown = sorted(index for index in {**self.replaced, **self.structured} if index not in layer_map.layers)
        if unknown:
            raise PassInputError(
                f"cannot replace layers {unknown}: the model has decoder layers {list(layer_map.layers)}"
            )
        for index, factors in [*self.replaced.items(), *self.structured.items()]:
            for module in factors:
                site = layer_map.find_linear(module)
                if site.layer != index:
                    raise PassInputError(f"module {module!r} is not in decoder layer {index}")
        # The parts check the rest (factor shapes, layer lists) before anything changes.
        self._split_pass().requires(model)
        self._structured_pass().requires(model)
        self._remove_pass().requires(model)

    def call(self, model: ir.Model) -> StatsResult:
        split = self._split_pass()(model)
        structured = self._structured_pass()(model)
        remove = self._remove_pass()(model)
        replaced = {index for index, factors in [*self.replaced.items(), *self.structured.items()] if factors}
        stats = ReplaceLayersStats(
            layers_replaced=len(replaced),
            layers_removed=remove.stats.layers_removed,
            matmuls_split=split.stats.matmuls_split,
            structured=structured.stats.ops,
            params_before=split.stats.params_before + structured.stats.params_before,
            params_after=split.stats.params_after + structured.stats.params_after,
            nodes_removed=remove.stats.nodes_removed,
        )
        return StatsResult(model, modified=split.modified or structured.modified or remove.modified, stats=stats)

    def _split_pass(self) -> SplitLowRankPass:
        flat = {module: arrays for factors in self.replaced.values() for module, arrays in factors.items()}
        return SplitLowRankPass(flat)

    def _structured_pass(self) -> SplitStructuredPass:
        return SplitStructuredPass({module: value for factors in self.structured.values() for module, value in factors.items()})

    def _remove_pass(self) -> RemoveLayersPass:
        return RemoveLayersPass(self.removed, self.kv_names)
