"""RemoveLayersPass: before/after on a toy decoder graph, parity with PyTorch on an exported Llama."""

from __future__ import annotations

import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.passes.remove_layers import RemoveLayersPass


@pytest.mark.parametrize(
    ("removed", "kept"),
    [([1], [0, 2]), ([0], [1, 2]), ([2], [0, 1]), ([0, 2], [1]), ([0, 1], [2])],
)
def test_removing_layers_gives_the_graph_built_without_them(toy_decoder, structure, removed, kept):
    model = toy_decoder([0, 1, 2])

    result = RemoveLayersPass(removed)(model)

    assert result.modified and result.model is model
    assert structure(model) == structure(toy_decoder(kept))


def test_counts_for_the_report(toy_decoder):
    model = toy_decoder([0, 1, 2])
    nodes_before = len(model.graph)
    remove = RemoveLayersPass([1])

    remove_result = remove(model)

    assert remove_result.stats.layers_removed == 1
    assert remove_result.stats.nodes_removed == nodes_before - len(model.graph) == 15
    assert (remove_result.stats.kv_inputs_removed, remove_result.stats.kv_outputs_removed) == (2, 2)


def test_removing_nothing_leaves_the_graph_alone(toy_decoder, structure):
    model = toy_decoder([0, 1])
    before = structure(model)

    result = RemoveLayersPass([])(model)

    assert not result.modified
    assert structure(model) == before


@pytest.mark.parametrize(
    ("layers", "message"),
    [([3], "cannot remove layers [3]"), ([-1], "cannot remove layers [-1]"), ([0, 1, 2], "cannot remove all 3")],
)
def test_bad_layer_lists_are_user_errors(toy_decoder, layers, message):
    with pytest.raises(EdgeCompressError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        RemoveLayersPass(layers)(toy_decoder([0, 1, 2]))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("removed", [[1], [0], [0, 2]])
def test_exported_llama_matches_torch_without_those_layers(fresh_torch_and_onnx, decoder_parity, removed):
    torch_model, onnx_model = fresh_torch_and_onnx

    RemoveLayersPass(removed)(onnx_model)
    decoder_parity.delete_layers(torch_model, removed)

    feeds = decoder_parity.feeds(3 - len(removed))
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))
