"""ONNX graph passes on onnx-ir models (never torch). One pass per file, `<Verb><Object>Pass`; each
returns a `StatsResult` (what it changed, what did not fire and why) and checks its ordering against
the others in `requires()`. The stages that run them, in order, are in edgecompress.graph_stages."""

from edgecompress.folder_names import defer_to_installed, imported_by_folder_name

if imported_by_folder_name(__name__):  # the clone is on sys.path: this is not edgecompress.passes
    defer_to_installed(__name__, __file__)
else:
    from edgecompress.passes.convert_float16 import ConvertFloat16Pass
    from edgecompress.passes.emulate_fp16_storage import EmulateFp16StoragePass
    from edgecompress.passes.factor_embedding import FactorEmbeddingPass
    from edgecompress.passes.fuse_group_query_attention import FuseGroupQueryAttentionPass
    from edgecompress.passes.fuse_low_rank import FuseLowRankPass
    from edgecompress.passes.fuse_ort_ops import FuseOrtOpsPass
    from edgecompress.passes.graph_edits import StatsResult
    from edgecompress.passes.keep_last_logits import KeepLastLogitsPass
    from edgecompress.passes.layer_map import PassInputError, build_layer_map
    from edgecompress.passes.lower_custom_ops import LowerCustomOpsPass
    from edgecompress.passes.map_gguf_weights import GgufBlocks, MapGgufWeightsPass
    from edgecompress.passes.pack_projections import PackProjectionsPass
    from edgecompress.passes.quantize_weights import QuantizeWeightsPass
    from edgecompress.passes.remove_identity_expands import RemoveIdentityExpandsPass
    from edgecompress.passes.remove_layers import RemoveLayersPass
    from edgecompress.passes.replace_layers import ReplaceLayersPass
    from edgecompress.passes.share_kv_buffer import ShareKvBufferPass
    from edgecompress.passes.split_low_rank import SplitLowRankPass
    from edgecompress.passes.split_structured import SplitStructuredPass

    __all__ = [
        "ConvertFloat16Pass",
        "EmulateFp16StoragePass",
        "FactorEmbeddingPass",
        "FuseGroupQueryAttentionPass",
        "FuseLowRankPass",
        "FuseOrtOpsPass",
        "GgufBlocks",
        "KeepLastLogitsPass",
        "LowerCustomOpsPass",
        "MapGgufWeightsPass",
        "PackProjectionsPass",
        "PassInputError",
        "QuantizeWeightsPass",
        "RemoveIdentityExpandsPass",
        "RemoveLayersPass",
        "ReplaceLayersPass",
        "ShareKvBufferPass",
        "SplitLowRankPass",
        "SplitStructuredPass",
        "StatsResult",
        "build_layer_map",
    ]
