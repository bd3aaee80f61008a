"""PyTorch-side attribution: layer scores (BI, angular distance), gradient-scored singular groups
(GRASP), plain and whitened (SVD-LLM) singular bases, low-rank, Monarch and BLAST factors and their refits, all run by
one layer walker; the tied embedding's weighted factorization. Nothing here touches ONNX."""

from edgecompress.attribution.block_influence import LayerScores, block_influence, layer_scores
from edgecompress.attribution.embedding import FactoredEmbedding, factor_embedding, install_factored_embedding
from edgecompress.attribution.grasp import accumulated_sigma_gradients, group_scores
from edgecompress.attribution.layer_walker import LayerStream, LayerWalker, Placement, record_stream
from edgecompress.attribution.low_rank import LowRankLinear, install_low_rank
from edgecompress.attribution.singular_basis import SigmaLinear, SingularBasis, top_indices
from edgecompress.attribution.structured import BlastLinear, MonarchLinear, install_structured
from edgecompress.attribution.svd import largest_sigma, weight_basis
from edgecompress.attribution.svd_llm import input_grams, whitened_basis

__all__ = [
    "BlastLinear",
    "FactoredEmbedding",
    "LayerScores",
    "LayerStream",
    "LayerWalker",
    "LowRankLinear",
    "MonarchLinear",
    "Placement",
    "SigmaLinear",
    "SingularBasis",
    "accumulated_sigma_gradients",
    "block_influence",
    "factor_embedding",
    "group_scores",
    "input_grams",
    "install_factored_embedding",
    "install_low_rank",
    "install_structured",
    "largest_sigma",
    "layer_scores",
    "record_stream",
    "top_indices",
    "weight_basis",
    "whitened_basis",
]
