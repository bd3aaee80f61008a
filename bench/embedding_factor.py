"""The tied embedding as part of the budget, on SmolLM2-135M: perplexity by share and exact-token count in
PyTorch (nothing trained), and the speed of the ONNX forms of the factored lookup and head on onnxruntime CPU.

Protocol (compression-quality-literature.md §5 and its appendix): token frequencies from the first
`--windows` x 512 tokens of wiki.valid.tokens, the hidden covariance from the first `--covariance-windows`
of them (the final normed states), perplexity on the first `--eval-windows` non-overlapping 512-token
windows of wiki.test.raw (exp of the mean next-token NLL, float64 log-sum-exp). The test split is never fitted.
Share = parameters the factored table removes / all parameters (the tied table counted once).

Forms: a graph holding only the tied lookup and head at SmolLM2's sizes (K = 2048, rank 427: 5 %), random
values, timed as one decode step ([1, 1] ids, [1, 1, 576] hidden) and one 512-token prefill, 2 threads;
the dense table, the pass's form (ScatterElements), the Concat + Gather form it replaced, and both int4.

Usage: python bench/embedding_factor.py [--no-quality] [--no-forms]; writes bench/results/embedding-factor.json.
Data: $EDGECOMPRESS_DATA (the Makefile points it at shared/data/wikitext-2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgecompress.report import machine_description

RESULTS = Path(__file__).parent / "results" / "embedding-factor.json"
SEQ_LEN = 512


# ---------------------------------------------------------------- perplexity by share and K


def _windows(tokenizer, path: Path, count: int):
    import torch

    from edgecompress.runtimes.text_sources import read_text_file

    ids = tokenizer(read_text_file(path), add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < count * SEQ_LEN:
        raise SystemExit(f"{path} has {len(ids)} tokens, fewer than {count} windows of {SEQ_LEN}")
    return torch.as_tensor(ids[: count * SEQ_LEN], dtype=torch.int64).reshape(count, SEQ_LEN)


def perplexity(model, windows) -> float:
    import torch

    total, scored = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].double()
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, window[1:, None])[:, 0]
            total, scored = total + float(nll.sum()), scored + nll.numel()
    return math.exp(total / scored)


def quality(args, record: dict) -> None:
    """Dense, then every (share, K): one weighted SVD per K, each rank evaluated with the factors installed."""
    import torch

    from edgecompress import models
    from edgecompress.attribution.embedding import (WeightedBasis, frequencies_from_counts, hidden_gram,
                                                    install_factored_embedding, token_counts, token_order)
    from edgecompress.attribution.layer_walker import set_submodule
    from edgecompress.plan import embedding_rank_for_share, embedding_saving

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = models.load(models.resolve("smollm2-135m"))
    model, data = loaded.model.eval(), Path(args.data)
    calibration = _windows(loaded.tokenizer, data / "wiki.valid.tokens", args.windows)
    test = _windows(loaded.tokenizer, data / "wiki.test.raw", args.eval_windows)
    vocab, hidden = model.model.embed_tokens.weight.shape
    total = sum(p.numel() for p in model.parameters())
    gram, n_tokens = hidden_gram(model, calibration[: args.covariance_windows])
    counts = token_counts(calibration, vocab)
    record["timings_s"] = {"load_and_statistics": round(time.perf_counter() - started, 1)}
    dense = perplexity(model, test)
    record["dense"] = {"perplexity": dense, "params": total, "table_params": vocab * hidden}
    rows = record["rows"] = []
    for exact in args.exact:
        order = token_order(counts, exact)
        clock = time.perf_counter()
        basis = WeightedBasis(model.model.embed_tokens.weight, frequencies_from_counts(counts),
                              gram / n_tokens, order, exact, 1e-8)
        svd_s = round(time.perf_counter() - clock, 1)
        for share in args.shares:
            rank = embedding_rank_for_share(vocab, hidden, total, share, exact)
            a, b = basis.factors(rank)
            factors = {"exact": basis.exact_rows.float(), "a": a.float(), "b": b.float(), "order": order}
            originals = install_factored_embedding(model, factors)
            clock = time.perf_counter()
            ppl = perplexity(model, test)
            for name, module in originals.items():
                set_submodule(model, name, module)
            saved = embedding_saving(vocab, hidden, rank, exact)
            rows.append({"share": share, "exact_tokens": exact, "rank": rank, "params_removed": saved,
                         "achieved_share": saved / total, "perplexity": ppl, "x_dense": ppl / dense,
                         "svd_s": svd_s, "eval_s": round(time.perf_counter() - clock, 1),
                         "scores": basis.scores(rank, counts)})
            print(f"share {share:.3f} K {exact}: rank {rank}, ppl {ppl:.2f} (x{ppl / dense:.3f})", flush=True)
            _write(record)
    record["timings_s"]["total"] = round(time.perf_counter() - started, 1)


# ---------------------------------------------------------------- ONNX forms


def _tied_graph(vocab: int, hidden: int, seed: int = 0):
    """input_ids -> Gather(E) and hidden -> MatMul(Eᵀ), with the exporter's module metadata (E twice, as exported)."""
    import onnx_ir as ir

    from edgecompress.passes.layer_map import CLASS_HIERARCHY_KEY, NAME_SCOPES_KEY

    table = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)

    def initializer(name, array):
        return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(array, name=name))

    def meta(scopes, classes):
        return {NAME_SCOPES_KEY: repr(["", *scopes, "op"]),
                CLASS_HIERARCHY_KEY: repr(["LlamaForCausalLM", *classes, "aten"])}

    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, "seq"]))
    states = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "seq", hidden]))
    weights = [initializer("table", table), initializer("table_t", table.T.copy())]
    lookup = ir.node("Gather", [weights[0], ids], name="lookup", metadata_props=meta(
        ["model", "model.embed_tokens"], ["LlamaModel", "torch.nn.modules.sparse.Embedding"]))
    head = ir.node("MatMul", [states, weights[1]], name="head",
                   metadata_props=meta(["lm_head"], ["torch.nn.modules.linear.Linear"]))
    for node, name in ((lookup, "embedding"), (head, "logits")):
        node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids, states], [lookup.outputs[0], head.outputs[0]], nodes=[lookup, head],
                     initializers=weights, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _concat_gather_head(model, a: np.ndarray, order: np.ndarray) -> None:
    """Swap the pass's scatter head for Concat(h·exactᵀ, (h·bᵀ)·aᵀ) then Gather back into token order."""
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401 - RemoveUnusedNodesPass

    from edgecompress.passes.graph_edits import add_initializer

    graph = model.graph
    scatter = next(node for node in graph if node.op_type == "ScatterElements")
    exact_logits, rest = scatter.inputs[2], scatter.inputs[0].producer()
    a_t = add_initializer(graph, "a_t", a.T.copy())
    position = add_initializer(graph, "position", np.argsort(order).astype(np.int64))
    low_rank = ir.node("MatMul", [rest.inputs[0], a_t])
    joined = ir.node("Concat", [exact_logits, low_rank.outputs[0]], {"axis": -1})
    logits = ir.node("Gather", [joined.outputs[0], position], {"axis": -1})
    graph.insert_before(scatter, [low_rank, joined, logits])
    output = scatter.outputs[0]
    output.replace_all_uses_with(logits.outputs[0], replace_graph_outputs=True)
    output.name, logits.outputs[0].name = "scattered", "logits"
    logits.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the scatter and the zero-row head MatMul


def _form_models(exact_tokens: int, rank: int) -> dict:
    from edgecompress.passes import FactorEmbeddingPass, QuantizeWeightsPass

    vocab, hidden = 49152, 576
    rng = np.random.default_rng(1)
    exact = rng.standard_normal((exact_tokens, hidden)).astype(np.float32)
    a = rng.standard_normal((vocab - exact_tokens, rank)).astype(np.float32)
    b = rng.standard_normal((rank, hidden)).astype(np.float32)
    order = rng.permutation(vocab).astype(np.int64)
    forms = {"dense fp32": _tied_graph(vocab, hidden)}
    for name in ("factored fp32 (scatter, the pass)", "factored fp32 (concat+gather)", "factored int4"):
        forms[name] = _tied_graph(vocab, hidden)
        FactorEmbeddingPass(exact, a, b, order)(forms[name])
    _concat_gather_head(forms["factored fp32 (concat+gather)"], a, order)
    forms["dense int4"] = _tied_graph(vocab, hidden)
    for name in ("dense int4", "factored int4"):
        QuantizeWeightsPass(4, 32, accuracy_level=4)(forms[name])
    return forms


def _session(model, threads: int):
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])


def forms(args, record: dict) -> None:
    """Median ms per run of each form, decode and prefill, rounds interleaved across forms."""
    started = {"created": _now(), "machine": machine_description()}
    sessions = {name: _session(model, args.threads) for name, model in _form_models(2048, 427).items()}
    rng = np.random.default_rng(0)
    check = _feeds(rng, 3)
    scatter, gather = (sessions[f"factored fp32 ({form})"].run(None, check)
                       for form in ("scatter, the pass", "concat+gather"))
    assert all(np.allclose(x, y, atol=1e-3) for x, y in zip(scatter, gather)), "the two factored forms disagree"
    samples = {(name, seq): [] for name in sessions for seq in (1, SEQ_LEN)}
    for _ in range(args.rounds):
        for seq, reps in ((1, 50), (SEQ_LEN, 3)):
            feeds = _feeds(rng, seq)
            for name, session in sessions.items():
                session.run(None, feeds)
                for _ in range(reps):
                    clock = time.perf_counter()
                    session.run(None, feeds)
                    samples[(name, seq)].append((time.perf_counter() - clock) * 1e3)
    first = next(iter(sessions))
    record["forms"] = {
        **started,
        "sizes": {"vocab": 49152, "hidden": 576, "exact_tokens": 2048, "rank": 427, "threads": args.threads},
        "median_ms": {name: {"decode_1": round(statistics.median(samples[(name, 1)]), 3),
                             "prefill_512": round(statistics.median(samples[(name, SEQ_LEN)]), 1)}
                      for name in sessions},
        "samples": {"decode_1": len(samples[(first, 1)]), "prefill_512": len(samples[(first, SEQ_LEN)])},
    }
    _write(record)
    print(json.dumps(record["forms"]["median_ms"], indent=1), flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _feeds(rng, seq: int) -> dict:
    return {"input_ids": rng.integers(0, 49152, (1, seq)), "hidden": rng.standard_normal((1, seq, 576)).astype(np.float32)}


def _write(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("EDGECOMPRESS_DATA", "../shared/data/wikitext-2"))
    parser.add_argument("--windows", type=int, default=128, help="calibration windows (token frequencies)")
    parser.add_argument("--covariance-windows", type=int, default=16, help="of them, for the hidden covariance")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.025, 0.05, 0.075])
    parser.add_argument("--exact", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the forms")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--no-forms", action="store_true")
    args = parser.parse_args()
    record = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.no_quality:  # each part records when and on what it ran (a forms-only run keeps the rows)
        record.update(created=_now(), machine=machine_description())
        record["protocol"] = {
            "model": "smollm2-135m (GGUF Q4_1, dequantized to fp32)", "seq_len": SEQ_LEN,
            "frequencies": f"first {args.windows} windows of wiki.valid.tokens", "exact_tokens": "the K most frequent",
            "covariance": f"final normed hidden states of the first {args.covariance_windows} of those windows",
            "evaluation": f"first {args.eval_windows} windows of wiki.test.raw, PyTorch fp32", "training": "none"}
        quality(args, record)
    if not args.no_forms:
        forms(args, record)
    _write(record)


if __name__ == "__main__":
    main()
