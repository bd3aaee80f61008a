"""FactorEmbeddingPass: before/expected on a toy decoder, parity with PyTorch on a tied exported Llama, and the
passes after it (weight formats, fusions, fp16)."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.passes.factor_embedding import FACTORED_MARK, FactorEmbeddingPass
from edgecompress.passes.layer_map import PassInputError
from tests.passes.conftest import HIDDEN, VOCAB, ToyDecoderBuilder

EXPORT_VOCAB = 80  # not the hidden width, so a transposed table cannot pass for the table


def _factors(vocab: int, hidden: int, exact: int, rank: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    order = rng.permutation(vocab).astype(np.int64)
    return (rng.standard_normal((exact, hidden)).astype(np.float32),
            rng.standard_normal((vocab - exact, rank)).astype(np.float32),
            rng.standard_normal((rank, hidden)).astype(np.float32), order)


def _tied_toy(layer_ids=(0, 1)) -> ir.Model:
    """The toy decoder with its lm_head reading the embedding table (as Eᵀ, the exporter's folded form)."""
    model = ToyDecoderBuilder(layer_ids).build()
    table = model.graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    model.graph.initializers["lm_head.weight_t"].const_value = ir.tensor(table.T.copy(), name="lm_head.weight_t")
    return model


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.tensor(array).dtype),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _expected_toy(exact, a, b, order) -> ir.Model:
    """What the pass must leave, written out node by node."""
    model = _tied_toy()
    graph = model.graph
    gather, head = graph.node("node_embedding"), graph.node("node_logits")
    k = exact.shape[0]
    a_by_token = np.zeros((VOCAB, a.shape[1]), np.float32)
    a_by_token[order[k:]] = a
    row = {int(token): i for i, token in enumerate(order)}
    v = {name: _initializer(graph, f"model.embed_tokens.{name}", array) for name, array in {
        "exact": exact, "a_by_token": a_by_token, "b": b,
        "is_exact": np.array([[row[t] < k] for t in range(VOCAB)]),
        "exact_row": np.array([row[t] if row[t] < k else 0 for t in range(VOCAB)], np.int32),
        "exact_ids": order[:k].astype(np.int32)}.items()}
    ids, hidden = gather.inputs[1], head.inputs[0]

    def nodes(prefix, specs):
        made = []
        for i, (op, inputs, attributes) in enumerate(specs):
            inputs = [made[x].outputs[0] if isinstance(x, int) else x for x in inputs]
            made.append(ir.node(op, inputs, attributes, name=f"{prefix}_{i}_{op.lower()}"))
            made[-1].outputs[0].name = made[-1].name
        return made

    lookup = nodes("node_embedding_factored", [
        ("Gather", [v["is_exact"], ids], {}), ("Gather", [v["exact_row"], ids], {}), ("Gather", [v["exact"], 1], {}),
        ("Gather", [v["a_by_token"], ids], {}), ("MatMul", [3, v["b"]], {}), ("Where", [0, 2, 4], {})])
    logits = nodes("node_logits_factored", [
        ("Transpose", [v["exact"]], {"perm": [1, 0]}), ("MatMul", [hidden, 0], {}),
        ("Transpose", [v["b"]], {"perm": [1, 0]}), ("MatMul", [hidden, 2], {}),
        ("Transpose", [v["a_by_token"]], {"perm": [1, 0]}), ("MatMul", [3, 4], {}),
        ("Shape", [1], {}), ("Expand", [v["exact_ids"], 6], {}), ("ScatterElements", [5, 7, 1], {"axis": -1})])
    for old, new in ((gather, lookup), (head, logits)):
        graph.insert_before(old, new)
        output = old.outputs[0]
        output.replace_all_uses_with(new[-1].outputs[0], replace_graph_outputs=True)
        name, output.name = output.name, "old"
        new[-1].outputs[0].name = name
        graph.remove(old)
    for name in ("model.embed_tokens.weight", "lm_head.weight_t"):
        graph.initializers.pop(name)
    return model


def test_rewrite_gives_the_expected_graph(structure):
    factors = _factors(VOCAB, HIDDEN, exact=2, rank=3)
    model = _tied_toy()

    result = FactorEmbeddingPass(*factors)(model)

    assert result.modified and result.model is model
    assert structure(model) == structure(_expected_toy(*factors))
    assert model.metadata_props[FACTORED_MARK] == "1"


def test_stats_count_parameters_bytes_and_the_removed_tables():
    exact, a, b, order = _factors(VOCAB, HIDDEN, exact=2, rank=3)

    stats = FactorEmbeddingPass(exact, a, b, order)(_tied_toy()).stats

    assert (stats.vocab, stats.hidden, stats.rank, stats.exact_tokens) == (VOCAB, HIDDEN, 3, 2)
    assert stats.params_before == VOCAB * HIDDEN and stats.params_after == 2 * HIDDEN + 4 * 3 + 3 * HIDDEN
    assert sorted(stats.initializers_removed) == ["lm_head.weight_t", "model.embed_tokens.weight"]
    assert stats.bytes_removed == 2 * VOCAB * HIDDEN * 4  # the table and its folded transpose
    assert stats.zero_row_bytes == 2 * 3 * 4 and stats.index_bytes == VOCAB * 1 + VOCAB * 4 + 2 * 4
    assert stats.bytes_added == 4 * stats.params_after + stats.zero_row_bytes + stats.index_bytes
    assert (stats.nodes_removed, stats.nodes_added) == (2, 15)


def test_a_head_reading_the_table_through_a_transpose_drops_the_one_table():
    model = ToyDecoderBuilder([0]).build()
    graph = model.graph
    table = graph.initializers["model.embed_tokens.weight"]
    transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name="tied_t")
    head = graph.node("node_logits")
    graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])
    graph.initializers.pop("lm_head.weight_t")

    stats = FactorEmbeddingPass(*_factors(VOCAB, HIDDEN, exact=2, rank=3))(model).stats

    assert stats.initializers_removed == ["model.embed_tokens.weight"] and stats.bytes_removed == VOCAB * HIDDEN * 4
    assert stats.nodes_removed == 3 and "tied_t" not in [node.name for node in graph]


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: (f[0][:, :3], *f[1:]), "do not give the graph's"),
    (lambda f: (*f[:3], np.zeros(VOCAB, np.int64)), "not a permutation"),
    (lambda f: (*f[:3], f[3].astype(np.float32)), "not a permutation"),
])
def test_bad_factors_are_one_line_errors(change, message):
    with pytest.raises(EdgeCompressError, match=message) as error:
        FactorEmbeddingPass(*change(_factors(VOCAB, HIDDEN, exact=2, rank=3)))(_tied_toy())
    assert "\n" not in str(error.value)


def test_an_untied_head_and_a_second_run_are_refused():
    factors = _factors(VOCAB, HIDDEN, exact=2, rank=3)
    with pytest.raises(PassInputError, match="needs a tied lm_head"):
        FactorEmbeddingPass(*factors)(ToyDecoderBuilder([0]).build())
    model = _tied_toy()
    FactorEmbeddingPass(*factors)(model)
    with pytest.raises(PassInputError, match="already factored"):
        FactorEmbeddingPass(*factors)(model)


def test_a_fused_model_is_refused():
    model = _tied_toy()
    model.metadata_props["edgecompress.fused_ort_ops"] = "1"
    with pytest.raises(ir.passes.PreconditionError, match="before FuseOrtOpsPass"):
        FactorEmbeddingPass(*_factors(VOCAB, HIDDEN, exact=2, rank=3))(model)


# ---------------------------------------------------------------- on a real export


@pytest.fixture(scope="module")
def tied_export(tmp_path_factory):
    """(tied tiny Llama with vocab 80, its factors, path of its export): exported once."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgecompress.attribution.embedding import factor_embedding
    from edgecompress.export import export_onnx, save_model

    config = LlamaConfig(vocab_size=EXPORT_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, EXPORT_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    record, factors = factor_embedding(model, ids, None, exact_tokens=12, rank=8)
    folder = tmp_path_factory.mktemp("tied_export")
    save_model(export_onnx(model)[0], folder)
    arrays = [factors[f"model.embed_tokens.{name}"] for name in ("exact", "a", "b", "order")]
    return model, arrays, folder / "model.onnx"


def _factored(tied_export):
    import torch

    from edgecompress.attribution.embedding import install_factored_embedding

    model, arrays, path = tied_export
    reference = copy.deepcopy(model)
    install_factored_embedding(reference, dict(zip(("exact", "a", "b", "order"), map(torch.as_tensor, arrays))))
    onnx_model = ir.load(path)
    result = FactorEmbeddingPass(*arrays)(onnx_model)
    return reference, onnx_model, result


def test_logits_match_torch_with_the_same_factors(tied_export, decoder_parity):
    reference, onnx_model, result = _factored(tied_export)

    assert result.stats.bytes_removed == 2 * EXPORT_VOCAB * 32 * 4  # the export holds E and Eᵀ
    feeds = decoder_parity.feeds(2, vocab=EXPORT_VOCAB)
    expected = decoder_parity.torch(reference, feeds)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), expected, atol=1e-5)


def test_exact_rows_come_out_of_the_lookup_bitwise(tied_export, decoder_parity):
    model, (exact, a, b, order), _ = tied_export
    _, onnx_model, _ = _factored(tied_export)
    lookup = next(node for node in onnx_model.graph if node.op_type == "Where" and "embedding" in node.name)
    onnx_model.graph.outputs.append(lookup.outputs[0])
    feeds = decoder_parity.feeds(2, vocab=EXPORT_VOCAB)
    feeds["input_ids"] = np.stack([order[:3], order[-3:]])  # exact tokens, then factored ones

    rows = decoder_parity.onnx(onnx_model, feeds)[lookup.outputs[0].name]

    table = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(rows[0], table[order[:3]])
    np.testing.assert_allclose(rows[1], (a @ b)[-3:], atol=1e-6)


def test_weight_formats_take_the_head_and_leave_the_lookup_float(tied_export, decoder_parity):
    from edgecompress.passes import MapGgufWeightsPass, QuantizeWeightsPass
    from edgecompress.passes.map_gguf_weights import FACTORED_HEAD_REASON, GgufBlocks

    reference, onnx_model, _ = _factored(tied_export)
    blocks = GgufBlocks("Q8_0", np.zeros((EXPORT_VOCAB, 32), np.int8), np.ones((EXPORT_VOCAB, 1), np.float32))

    mapped = MapGgufWeightsPass({"lm_head": blocks})(onnx_model)
    quantized = QuantizeWeightsPass(bits=8, block_size=32, accuracy_level=4)(onnx_model)

    assert not mapped.modified and mapped.stats.skipped == {"lm_head": FACTORED_HEAD_REASON}
    assert quantized.stats.matmuls_quantized == 2 * 7 + 3  # every Linear, and the head's three MatMuls
    assert quantized.stats.skipped == {"kept float: factored embedding lookup": 1}
    feeds = decoder_parity.feeds(2, vocab=EXPORT_VOCAB)
    expected = decoder_parity.torch(reference, feeds)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), expected, atol=2e-2)


def test_fusions_and_fp16_are_unaffected(tied_export, decoder_parity):
    from edgecompress.passes import ConvertFloat16Pass, FuseGroupQueryAttentionPass, FuseOrtOpsPass
    from edgecompress.passes.convert_float16 import lm_head_nodes

    _, _, path = tied_export
    dense = ir.load(path)
    reference, onnx_model, _ = _factored(tied_export)
    fused = [FuseOrtOpsPass()(model).stats.fused_ops for model in (dense, onnx_model)]
    gqa = [FuseGroupQueryAttentionPass()(model).stats.fused for model in (dense, onnx_model)]
    assert fused[0] == fused[1] and gqa[0] == gqa[1] == 2

    head = lm_head_nodes(onnx_model.graph)
    assert [node.op_type for node in head] == ["MatMul", "MatMul", "MatMul", "ScatterElements"]
    ConvertFloat16Pass(node_block_list={node.name: "escalation" for node in head})(onnx_model)
    feeds = {name: value[:1].astype(np.float16) if value.dtype == np.float32 else value[:1]
             for name, value in decoder_parity.feeds(2, vocab=EXPORT_VOCAB).items()}
    expected = decoder_parity.torch(reference, {name: value.astype(np.float32) if value.dtype == np.float16 else value
                                                for name, value in feeds.items()})
    logits = decoder_parity.onnx(onnx_model, feeds)["logits"]
    np.testing.assert_allclose(logits, expected["logits"], atol=5e-3)
