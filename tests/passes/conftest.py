"""Fixtures for the graph-pass tests: a hand-built toy decoder graph and a tiny exported Llama.

The toy graph carries the same module metadata the dynamo exporter writes (name scopes and class
hierarchy), so the layer map reads it like a real export, in milliseconds.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.passes.layer_map import CLASS_HIERARCHY_KEY, NAME_SCOPES_KEY

HIDDEN = 4
VOCAB = 6
LINEAR_CLASS = "torch.nn.modules.linear.Linear"


def _module_class(scope: str) -> str:
    if scope == "model":
        return "transformers.LlamaModel"
    if scope.endswith("embed_tokens"):
        return "torch.nn.modules.sparse.Embedding"
    if re.fullmatch(r"model\.layers\.\d+", scope):
        return "transformers.LlamaDecoderLayer"
    if scope.endswith("self_attn"):
        return "transformers.LlamaAttention"
    if scope.endswith("mlp"):
        return "transformers.LlamaMLP"
    return LINEAR_CLASS


class ToyDecoderBuilder:
    """Builds a decoder graph whose layers are `layer_ids` (original indices, for scopes and weights).

    KV I/O is numbered by position, as after RemoveLayersPass. `low_rank` maps module names to
    (A, B) factors to build the graph SplitLowRankPass is expected to produce.
    """

    def __init__(self, layer_ids, low_rank=None):
        self.layer_ids = list(layer_ids)
        self.low_rank = low_rank or {}
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": 18}, name="toy")

    def build(self) -> ir.Model:
        input_ids = self._input("input_ids", ir.DataType.INT64, ["batch", "seq"])
        hidden = self._node(
            "Gather", [self._weight("model.embed_tokens.weight", (VOCAB, HIDDEN)), input_ids],
            "embedding", ["model", "model.embed_tokens"],
        )
        pasts = []
        for position, _ in enumerate(self.layer_ids):
            pasts.append(
                {kind: self._input(f"past_key_values.{position}.{kind}", ir.DataType.FLOAT,
                                   ["batch", 1, "past", HIDDEN]) for kind in ("key", "value")}
            )
        shared_axes = None
        for position, layer_id in enumerate(self.layer_ids):
            hidden, shared_axes = self._layer(position, layer_id, hidden, pasts[position], shared_axes)
        hidden = self._past_length_dependency(hidden, pasts[0]["key"])
        logits = self._linear("lm_head", hidden, ["lm_head"], (VOCAB, HIDDEN), out_name="logits")
        self.graph.outputs.insert(0, logits)
        return ir.Model(self.graph, ir_version=10)

    def _layer(self, position, layer_id, hidden, past, shared_axes):
        scope = f"model.layers.{layer_id}"
        attn = f"{scope}.self_attn"
        layer_scopes = ["model", scope]
        if shared_axes is None:
            # Shared by every layer like the exporter's CSE'd shape arithmetic: lives in the first layer.
            shared_axes = self._node(
                "Constant", [], "shared_axes", layer_scopes,
                attributes={"value": ir.tensor(np.array([1, 2], dtype=np.int64))},
            )
        q = self._linear(f"{attn}.q_proj", hidden, layer_scopes + [attn, f"{attn}.q_proj"], (HIDDEN, HIDDEN))
        attn_scopes = layer_scopes + [attn]
        one = self._weight("axis_one", None, np.array([1], dtype=np.int64))
        presents = {}
        for kind, proj in (("key", "k_proj"), ("value", "v_proj")):
            projected = self._linear(f"{attn}.{proj}", hidden, layer_scopes + [attn, f"{attn}.{proj}"], (HIDDEN, HIDDEN))
            new = self._node("Unsqueeze", [projected, one], f"{proj}_{layer_id}_4d", attn_scopes)
            present = self._node("Concat", [past[kind], new], f"present_{kind}_{layer_id}", attn_scopes,
                                 attributes={"axis": 2})
            present.name = f"present.{position}.{kind}"
            self.graph.outputs.append(present)
            presents[kind] = present
        both = self._node("Add", [presents["key"], presents["value"]], f"kv_{layer_id}", attn_scopes)
        context = self._node("ReduceMean", [both, shared_axes], f"context_{layer_id}", attn_scopes,
                             attributes={"keepdims": 0})
        context = self._node("Unsqueeze", [context, one], f"context3d_{layer_id}", attn_scopes)
        mixed = self._node("Mul", [q, context], f"mixed_{layer_id}", attn_scopes)
        o = self._linear(f"{attn}.o_proj", mixed, layer_scopes + [attn, f"{attn}.o_proj"], (HIDDEN, HIDDEN))
        middle = self._node("Add", [hidden, o], f"residual_mid_{layer_id}", layer_scopes)
        mlp = f"{scope}.mlp"
        down = self._linear(f"{mlp}.down_proj", middle, layer_scopes + [mlp, f"{mlp}.down_proj"], (HIDDEN, HIDDEN))
        return self._node("Add", [middle, down], f"residual_out_{layer_id}", layer_scopes), shared_axes

    def _past_length_dependency(self, hidden, past_key):
        """hidden + 0·past_len: like the mask's past length, read outside any layer from one cache."""
        scopes = ["model"]
        length = self._node("Shape", [past_key], "past_length", scopes, attributes={"start": 2, "end": 3})
        length = self._node("Cast", [length], "past_length_f", scopes, attributes={"to": ir.DataType.FLOAT})
        zero = self._weight("zero", None, np.zeros([1], dtype=np.float32))
        term = self._node("Mul", [length, zero], "past_length_term", scopes)
        return self._node("Add", [hidden, term], "final_hidden", scopes)

    def _linear(self, module, x, module_scopes, out_in, out_name=None):
        out_name = out_name or f"{module}.out"
        if module in self.low_rank:
            a, b = self.low_rank[module]
            a_t = self._weight(f"{module}.low_rank_a_t", None, a.T.astype(np.float32))
            h = self._node("MatMul", [x, a_t], f"{out_name}_low_rank_a", module_scopes)
            return self._node("MatMul", [h, self._weight(f"{module}.low_rank_b_t", None, b.T.astype(np.float32))],
                              out_name, module_scopes)
        weight_t = self._weight(f"{module}.weight_t", (out_in[1], out_in[0]))
        return self._node("MatMul", [x, weight_t], out_name, module_scopes)

    def _input(self, name, dtype, shape):
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.graph.inputs.append(value)
        return value

    def _weight(self, name, shape, array=None):
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        if array is None:
            # Deterministic per name, so "before" and "expected after" graphs hold the same weights.
            seed = sum(ord(c) * (i + 1) for i, c in enumerate(name))
            array = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def _node(self, op_type, inputs, out_name, module_scopes, attributes=None):
        # Exporter layout: the root module '' first, the op itself last.
        scopes = ["", *module_scopes, out_name]
        classes = ["transformers.LlamaForCausalLM", *map(_module_class, module_scopes), f"aten.{op_type.lower()}"]
        node = ir.node(op_type, inputs, attributes or {}, name=f"node_{out_name}",
                       metadata_props={NAME_SCOPES_KEY: repr(scopes), CLASS_HIERARCHY_KEY: repr(classes)})
        node.outputs[0].name = out_name
        integer_result = op_type in ("Shape", "Constant")
        node.outputs[0].type = ir.TensorType(ir.DataType.INT64 if integer_result else ir.DataType.FLOAT)
        self.graph.append(node)
        return node.outputs[0]


def graph_structure(model: ir.Model) -> dict:
    """What before/after tests compare: I/O names, initializer values, nodes in order (names aside)."""
    graph = model.graph
    nodes = []
    for node in graph:
        attributes = {name: repr(attr.value) for name, attr in node.attributes.items()}
        nodes.append((node.op_type, [v.name if v is not None else None for v in node.inputs],
                      [v.name for v in node.outputs], attributes))
    return {
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "initializers": {name: v.const_value.numpy().tolist() for name, v in sorted(graph.initializers.items())},
        "nodes": nodes,
    }


@pytest.fixture
def toy_decoder():
    """toy_decoder(layer_ids, low_rank=None) -> ir.Model"""
    return lambda layer_ids, low_rank=None: ToyDecoderBuilder(layer_ids, low_rank).build()


def make_tiny_torch_model(model_type: str = "llama", tie_word_embeddings: bool = False, seed: int = 0,
                          head_dim: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    config = config_class(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms are all ones; make them distinct like trained ones
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def _export_tiny(tmp_path_factory, model_type: str, **config):
    from edgecompress.export import export_onnx, save_model

    model = make_tiny_torch_model(model_type, **config)
    out_dir = tmp_path_factory.mktemp(f"tiny_{model_type}_onnx")
    save_model(export_onnx(model)[0], out_dir)
    return model, out_dir / "model.onnx"


@pytest.fixture(scope="session")
def exported_llama(tmp_path_factory):
    """(torch model, path to its exported model.onnx): export once, load fresh copies per test."""
    return _export_tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def exported_llama_head16(tmp_path_factory):
    """Like exported_llama with 16-dim heads: onnxruntime's GroupQueryAttention rotates multiples of 16 only."""
    return _export_tiny(tmp_path_factory, "llama", head_dim=16)


@pytest.fixture
def fresh_torch_and_onnx(exported_llama):
    model, path = exported_llama
    return copy.deepcopy(model), ir.load(path)


def decoder_feeds(num_layers: int, kv_heads: int = 2, head_dim: int = 8, vocab: int = 32, seed: int = 0):
    """Inputs for one decode step over a non-empty cache: batch 2, 3 new tokens, 4 cached."""
    rng = np.random.default_rng(seed)
    batch, seq, past = 2, 3, 4
    feeds = {
        "input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    for index in range(num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{index}.{kind}"] = rng.standard_normal((batch, kv_heads, past, head_dim)).astype(
                np.float32
            )
    return feeds


def run_onnx(model: ir.Model, feeds: dict) -> dict:
    """Save like an artifact (model.onnx + model.onnx.data) and run it with onnxruntime."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(None, feeds)))


def run_torch(model, feeds: dict) -> dict:
    """The same step in PyTorch, with outputs named like the ONNX graph's."""
    import torch
    from transformers import DynamicCache

    num_layers = len(model.model.layers)
    cache = DynamicCache(config=model.config)
    for index in range(num_layers):
        cache.update(torch.from_numpy(feeds[f"past_key_values.{index}.key"]),
                     torch.from_numpy(feeds[f"past_key_values.{index}.value"]), index)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feeds["input_ids"]),
            attention_mask=torch.from_numpy(feeds["attention_mask"]),
            position_ids=torch.from_numpy(feeds["position_ids"]),
            past_key_values=cache,
            use_cache=True,
        )
    results = {"logits": out.logits.numpy()}
    for index, layer in enumerate(out.past_key_values.layers[:num_layers]):
        results[f"present.{index}.key"] = layer.keys.numpy()
        results[f"present.{index}.value"] = layer.values.numpy()
    return results


def delete_torch_layers(model, indices) -> None:
    """The PyTorch side of RemoveLayersPass: drop layers, renumber the survivors' cache slots."""
    import torch

    kept = [layer for index, layer in enumerate(model.model.layers) if index not in indices]
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index


@pytest.fixture
def decoder_parity():
    """Helpers shared by the numerical tests, as a namespace."""

    class Parity:
        feeds = staticmethod(decoder_feeds)
        onnx = staticmethod(run_onnx)
        torch = staticmethod(run_torch)
        delete_layers = staticmethod(delete_torch_layers)

        @staticmethod
        def assert_close(onnx_out: dict, torch_out: dict, atol: float = 1e-4):
            assert sorted(onnx_out) == sorted(torch_out)
            for name, expected in torch_out.items():
                np.testing.assert_allclose(onnx_out[name], expected, atol=atol, rtol=0, err_msg=name)

    return Parity


@pytest.fixture
def structure():
    """structure(model) -> the comparable description of its graph."""
    return graph_structure


@pytest.fixture(scope="session")
def exported_qwen2(tmp_path_factory):
    """Qwen2 has q/k/v biases: the exporter emits MatMul followed by a bias Add in the Linear's scope."""
    return _export_tiny(tmp_path_factory, "qwen2")


def svd_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A [rank, in], B [out, rank] with B·A the best rank-`rank` approximation of `weight` [out, in]."""
    u, sigma, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    root = np.sqrt(sigma[:rank])
    return (root[:, None] * vt[:rank]).astype(np.float32), (u[:, :rank] * root).astype(np.float32)


@pytest.fixture
def factors_for():
    """factors_for(torch_model, modules, rank=None) -> {module: (A, B)} from each weight's SVD."""

    def make(torch_model, modules, rank=None):
        factors = {}
        for module in modules:
            weight = torch_model.get_submodule(module).weight.detach().numpy()
            factors[module] = svd_factors(weight, rank or min(weight.shape))
        return factors

    return make
