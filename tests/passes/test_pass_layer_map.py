"""The layer map reads decoder layers, Linears and KV ownership from exporter metadata."""

from __future__ import annotations

from edgecompress.passes.layer_map import LINEAR_MODULES, build_layer_map


def test_toy_decoder_layers_chain_through_the_residual(toy_decoder):
    layer_map = build_layer_map(toy_decoder([0, 1, 2]).graph)

    assert list(layer_map.layers) == [0, 1, 2]
    assert layer_map.layers[0].residual_input.name == "embedding"
    assert [layer.residual_output.name for layer in layer_map.layers.values()] == [
        "residual_out_0", "residual_out_1", "residual_out_2",
    ]
    assert layer_map.layers[2].residual_input is layer_map.layers[1].residual_output


def test_toy_decoder_kv_belongs_to_the_layer_that_reads_and_writes_it(toy_decoder):
    layer_map = build_layer_map(toy_decoder([0, 1, 2]).graph)

    for index, layer in layer_map.layers.items():
        assert {kind: value.name for kind, value in layer.past_inputs.items()} == {
            "key": f"past_key_values.{index}.key", "value": f"past_key_values.{index}.value",
        }
        assert {kind: value.name for kind, value in layer.present_outputs.items()} == {
            "key": f"present.{index}.key", "value": f"present.{index}.value",
        }


def test_toy_decoder_linears_by_module_name(toy_decoder):
    layer_map = build_layer_map(toy_decoder([0, 1]).graph)

    site = layer_map.find_linear("model.layers.1.self_attn.q_proj")
    assert site.layer == 1 and site.node.op_type == "MatMul" and site.weight_is_transposed
    assert layer_map.find_linear("lm_head").layer is None
    assert (site.out_features, site.in_features) == (4, 4)


def test_exported_llama_maps_every_linear_and_layer(exported_llama):
    import onnx_ir as ir

    torch_model, path = exported_llama
    layer_map = build_layer_map(ir.load(path).graph)

    assert layer_map.num_layers == 3
    expected = {name for name, module in torch_model.named_modules() if name.endswith(LINEAR_MODULES + ("lm_head",))}
    assert set(layer_map.linears) == expected
    for name, site in layer_map.linears.items():
        weight = torch_model.get_submodule(name).weight
        assert (site.out_features, site.in_features) == tuple(weight.shape), name
    for index in (1, 2):
        assert layer_map.layers[index].residual_input is layer_map.layers[index - 1].residual_output
    for index, layer in layer_map.layers.items():
        assert layer.past_inputs["key"].name == f"past_key_values.{index}.key"
        assert layer.present_outputs["value"].name == f"present.{index}.value"
