"""Verification, a stage of every build: one harness, two comparison rules.

The harness checks that an artifact is valid ONNX, loads in onnxruntime, and reproduces a reference
on a prefill, one cached decode step (both sides fed the reference's cache, so only that step is
compared), a left-padded batch of two, and greedy generation:

- `verify`: the fp32 export (compressed or not) against PyTorch, with `ExactRule` (max|Δ| <= atol +
  rtol·max|reference logit|, same argmax everywhere) and identical greedy tokens;
- `verify_optimized`: a fused or low-bit artifact against the verified fp32 export, read-only, whose
  greedy tokens are passed along, not recomputed. Fused fp32 keeps `ExactRule`; int8/int4 weights
  change logits by design, so `LowBitRule` bounds the mean KL divergence and top-1 agreement, and the
  greedy run is reported, not required to be identical; an fp16 artifact gets `Fp16Rule` (KL, top-1,
  max|Δlogit|, no NaN/Inf), and `half_precision_parity` runs the same checks on it and on its
  fp16-storage twin while the build chooses its block lists.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgecompress.contract import MODEL_FILE
from edgecompress.errors import VerificationError, first_line
from edgecompress.targets.profiles import Fp16Bounds, LowBitBounds, TargetProfile, VerifyBounds

DEFAULT_PROMPT = "Explain in one sentence why the sky is blue."
# onnxruntime's fused SimplifiedLayerNormalization lives in the ai.onnx domain but only onnxruntime
# defines it, so onnx.checker rejects any graph that has it.
ORT_ONLY_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


class ExactRule:
    """Equal up to float rounding: the fp32 export against PyTorch, a fused fp32 graph against the export.
    Logits may differ by at most logits_atol + logits_rtol * max|reference logit| (the profile's [verify])."""

    exact = True

    def __init__(self, bounds: VerifyBounds):
        self.bounds = bounds

    def compare(self, name: str, ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
        diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
        bound = self.bounds.logits_atol + self.bounds.logits_rtol * float(np.max(np.abs(ref)))
        same_argmax = bool(np.array_equal(ours.argmax(-1), ref.argmax(-1)))
        return {"check": name, "max_abs_diff": diff, "bound": bound, "argmax_equal": same_argmax,
                "passed": diff <= bound and same_argmax}

    @staticmethod
    def detail(check: dict[str, Any]) -> str:
        return f" (max |diff| {check['max_abs_diff']:.3g} > {check['bound']:.3g})" if "bound" in check else ""


class LowBitRule:
    """Close in distribution: int8/int4 weights against the fp32 export."""

    exact = False

    def __init__(self, bounds: LowBitBounds):
        self.bounds = bounds

    def compare(self, name: str, ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
        log_p, log_q = _log_softmax(ref), _log_softmax(ours)
        kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
        top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
        return {
            "check": name,
            "max_abs_diff": float(np.max(np.abs(ours.astype(np.float64) - ref))),
            "mean_kl": kl,
            "top1_agreement": top1,
            "bounds": {"max_mean_kl": self.bounds.max_mean_kl, "min_top1_agreement": self.bounds.min_top1_agreement},
            "passed": kl <= self.bounds.max_mean_kl and top1 >= self.bounds.min_top1_agreement,
        }

    @staticmethod
    def detail(check: dict[str, Any]) -> str:
        if "bounds" not in check:
            return ""
        return (f" (mean KL {check['mean_kl']:.3g}, top-1 agreement {check['top1_agreement']:.2f};"
                f" bounds {check['bounds']})")


class Fp16Rule:
    """Close in distribution, bounded elementwise, and finite: a half-precision artifact (or its
    fp16-storage twin) against the fp32 export, with `[verify.float16]`'s bounds. Each comparison
    bounds mean KL, max|Δlogit| and NaN/Inf; top-1 agreement is bounded over all compared positions
    together (`pooled`), as one flip in a single decode position says nothing."""

    exact = False

    def __init__(self, bounds: Fp16Bounds):
        self.bounds = bounds

    def compare(self, name: str, ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
        nonfinite = int(ours.size - np.count_nonzero(np.isfinite(ours)))
        check: dict[str, Any] = {"check": name, "positions": int(np.prod(ours.shape[:-1])), "nonfinite": nonfinite,
                                 "bounds": self.describe_bounds()}
        if nonfinite:
            return {**check, "mean_kl": None, "top1_agreement": None, "max_abs_diff": None, "agreeing": 0,
                    "passed": False}
        log_p, log_q = _log_softmax(ref), _log_softmax(ours)
        kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
        agreeing = int(np.count_nonzero(ours.argmax(-1) == ref.argmax(-1)))
        diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
        return {**check, "mean_kl": kl, "top1_agreement": agreeing / check["positions"], "max_abs_diff": diff,
                "agreeing": agreeing,
                "passed": kl <= self.bounds.max_mean_kl and diff <= self.bounds.max_abs_logit_delta}

    def pooled(self, checks: list[dict[str, Any]]) -> dict[str, Any]:
        """Top-1 agreement and the worst numbers over every comparison in `checks`."""
        compared = [check for check in checks if "agreeing" in check]
        positions = sum(check["positions"] for check in compared)
        agreeing = sum(check["agreeing"] for check in compared)
        finite = [check for check in compared if not check["nonfinite"]]
        top1 = agreeing / positions if positions else 0.0
        return {
            "check": f"top-1 agreement over {positions} positions",
            "positions": positions,
            "top1_agreement": top1,
            "mean_kl": (sum(c["mean_kl"] * c["positions"] for c in finite) / sum(c["positions"] for c in finite)
                        if finite else None),
            "max_mean_kl": max((c["mean_kl"] for c in finite), default=None),
            "max_abs_diff": max((c["max_abs_diff"] for c in finite), default=None),
            "nonfinite": sum(check["nonfinite"] for check in compared),
            "bounds": self.describe_bounds(),
            "passed": top1 >= self.bounds.min_top1_agreement and all(c["passed"] for c in compared),
        }

    def describe_bounds(self) -> dict[str, float]:
        return {"max_mean_kl": self.bounds.max_mean_kl, "min_top1_agreement": self.bounds.min_top1_agreement,
                "max_abs_logit_delta": self.bounds.max_abs_logit_delta}

    @staticmethod
    def detail(check: dict[str, Any]) -> str:
        if "bounds" not in check:
            return ""
        if check["nonfinite"] and check.get("mean_kl") is None:
            return f" ({check['nonfinite']} NaN/Inf logits)"
        return (f" (mean KL {check['mean_kl']:.3g}, top-1 agreement {check['top1_agreement']:.3f}, max |Δlogit| "
                f"{check['max_abs_diff']:.3g}, NaN/Inf {check['nonfinite']}; bounds {check['bounds']})")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    scores = logits.astype(np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))


def prompt_ids(tokenizer: Any, prompt: str = DEFAULT_PROMPT) -> list[int]:
    """The verification prompt through the chat template when the model has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


class TorchReference:
    """The PyTorch model driven with the same flat inputs as the ONNX graph."""

    def __init__(self, model: Any):
        from edgecompress.export import make_flat_kv_module

        self.module = make_flat_kv_module(model)
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        import torch

        with torch.no_grad():
            outputs = self.module(
                torch.as_tensor(input_ids),
                torch.as_tensor(attention_mask),
                torch.as_tensor(position_ids),
                *[torch.as_tensor(p) for p in past],
            )
        return outputs[0].numpy(), [o.numpy() for o in outputs[1:]]

    def greedy(self, prompt: list[int], max_new_tokens: int, kv_shape: tuple[int, int]) -> list[int]:
        kv_heads, head_dim = kv_shape
        past = [np.zeros((1, kv_heads, 0, head_dim), np.float32) for _ in range(2 * self.num_layers)]
        ids, length, tokens = np.asarray([prompt], np.int64), 0, []
        while len(tokens) < max_new_tokens:
            step = ids.shape[1]
            mask = np.ones((1, length + step), np.int64)
            positions = np.arange(length, length + step, dtype=np.int64)[None, :]
            logits, past = self.forward(ids, mask, positions, past)
            length += step
            tokens.append(int(np.argmax(logits[0, -1])))
            ids = np.asarray([[tokens[-1]]], np.int64)
        return tokens


def left_padded_batch(ids: list[int]) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Two rows of a prefill: `ids`, and `ids` with its first tokens replaced by left padding (mask 0,
    positions restarting at 0 after the pad). Returns the pad length and (input_ids, mask, positions)."""
    n = len(ids)
    pad = min(3, max(1, n - 1))
    batch_ids = np.asarray([ids, [0] * pad + ids[pad:]], np.int64)
    batch_mask = np.ones_like(batch_ids)
    batch_mask[1, :pad] = 0
    batch_pos = np.stack([np.arange(n), np.concatenate([np.zeros(pad), np.arange(n - pad)])]).astype(np.int64)
    return pad, (batch_ids, batch_mask, batch_pos)


# --- the harness ----------------------------------------------------------------------------------


def _checker(model_file: Path) -> dict[str, Any]:
    """onnx.checker on the path (works past the 2 GB protobuf limit); skipped, with the reason, for a graph
    with onnxruntime-only ops in the default domain (its unfused fp32 export was checked before)."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    ort_only = sorted({node.op_type for node in proto.graph.node if node.domain in ("", "ai.onnx")}
                      & ORT_ONLY_DEFAULT_DOMAIN_OPS)
    if ort_only:
        return {"check": "onnx.checker", "skipped": f"onnxruntime-only ops in the ai.onnx domain: {', '.join(ort_only)}",
                "passed": True}
    try:
        onnx.checker.check_model(str(model_file))
    except Exception as exc:
        raise VerificationError(f"onnx.checker rejected the model: {first_line(exc)}") from None
    return {"check": "onnx.checker", "passed": True}


def _load(folder: Path, **session_kwargs):
    from edgecompress.runtimes.decoder import OrtDecoder
    from edgecompress.runtimes.errors import RuntimeLoadError

    try:
        return OrtDecoder(folder, **session_kwargs)
    except RuntimeLoadError as exc:
        raise VerificationError(str(exc)) from None


def parity_checks(ours, ref, text: list[int], rule) -> list[dict[str, Any]]:
    """Prefill of `text`, one cached decode step on the reference's cache, and a left-padded batch.

    `ours` is an OrtDecoder; `ref` anything with the same `forward` (a TorchReference, an OrtDecoder)."""
    empty = getattr(ref, "empty_cache", ours.empty_cache)  # each side's cache dtype
    ids = np.asarray([text], np.int64)
    n = ids.shape[1]
    mask, positions = np.ones_like(ids), np.arange(n, dtype=np.int64)[None, :]
    ref_logits, ref_past = ref.forward(ids, mask, positions, empty(1))
    our_logits, _ = ours.forward(ids, mask, positions, ours.empty_cache(1))
    checks = [rule.compare(f"prefill logits ({n} tokens)", our_logits, ref_logits)]

    next_id = np.asarray([[int(np.argmax(ref_logits[0, -1]))]], np.int64)
    step_mask, step_pos = np.ones((1, n + 1), np.int64), np.asarray([[n]], np.int64)
    ref_step, _ = ref.forward(next_id, step_mask, step_pos, ref_past)
    our_past = [past.astype(ours.layout.dtype, copy=False) for past in ref_past]  # an fp16 artifact's cache is fp16
    our_step, _ = ours.forward(next_id, step_mask, step_pos, our_past)
    checks.append(rule.compare(f"decode logits (1 token, {n} past)", our_step, ref_step))

    pad, (batch_ids, batch_mask, batch_pos) = left_padded_batch(text)
    ref_b, _ = ref.forward(batch_ids, batch_mask, batch_pos, empty(2))
    our_b, _ = ours.forward(batch_ids, batch_mask, batch_pos, ours.empty_cache(2))
    checks.append(rule.compare("padded batch prefill logits (2 rows)", our_b[:, pad:], ref_b[:, pad:]))
    return checks


def _raise_if_failed(report: dict[str, Any], rule, what: str) -> dict[str, Any]:
    report["passed"] = all(check["passed"] for check in report["checks"])
    if not report["passed"]:
        failed = next(check for check in report["checks"] if not check["passed"])
        raise VerificationError(f"{what}: {failed['check']}{rule.detail(failed)}", report)
    return report


def verify(artifact_dir: Path, model: Any, tokenizer: Any, bounds: VerifyBounds, progress: Callable | None = None,
           **session_kwargs) -> dict[str, Any]:
    """The fp32 export against PyTorch (`model`, with the plan applied for a compressed build)."""
    step = progress or (lambda message: None)
    started = time.perf_counter()
    rule = ExactRule(bounds)
    tokens = bounds.greedy_tokens
    report: dict[str, Any] = {"tolerances": {"logits_atol": bounds.logits_atol, "logits_rtol": bounds.logits_rtol},
                              "checks": []}
    step("onnx.checker")
    report["checks"].append(_checker(artifact_dir / MODEL_FILE))
    step("onnxruntime load")
    decoder = _load(artifact_dir, **session_kwargs)
    report["checks"].append({"check": "onnxruntime load", "passed": True})
    torch_ref = TorchReference(model)
    prompt = prompt_ids(tokenizer)
    step("prefill and decode parity")
    report["checks"] += parity_checks(decoder, torch_ref, prompt, rule)
    step(f"greedy generation ({tokens} tokens)")
    ort_tokens = decoder.greedy(prompt, tokens)
    ref_tokens = torch_ref.greedy(prompt, tokens, (decoder.layout.kv_heads, decoder.layout.head_dim))
    report["greedy"] = {
        "prompt_tokens": len(prompt),
        "onnxruntime": ort_tokens,
        "pytorch": ref_tokens,
        "text": tokenizer.decode(ort_tokens, skip_special_tokens=False),
        "identical": ort_tokens == ref_tokens,
    }
    report["checks"].append({"check": f"greedy {tokens} tokens identical", "passed": ort_tokens == ref_tokens})
    report["seconds"] = round(time.perf_counter() - started, 2)
    return _raise_if_failed(report, rule, "verification failed")


def comparison_rule(weights: str, profile: TargetProfile):
    """ExactRule for fused fp32, Fp16Rule for a half-precision artifact, LowBitRule for int8/int4."""
    if weights == "fp32":
        return ExactRule(profile.verify)
    if weights == "fp16":
        return Fp16Rule(profile.verify.float16)
    return LowBitRule(profile.low_bit_bounds(weights))


def half_precision_parity(artifact_dir: Path | None, twin_dir: Path, reference_dir: Path, text: list[int],
                          held_out: list[list[int]], bounds: Fp16Bounds, progress: Callable | None = None,
                          **session_kwargs) -> dict[str, Any]:
    """Checks (a) and (c) of fp16 validation: the half-precision artifact on this machine's provider and
    its fp16-storage twin (passes.EmulateFp16StoragePass), each against the fp32 export with Fp16Rule:
    prefill, cached decode step and left-padded batch of `text`, plus a prefill of each `held_out`
    window. `artifact_dir` None: the artifact cannot run here (bf16 on the CPU provider); the twin only."""
    step = progress or (lambda message: None)
    rule = Fp16Rule(bounds)
    ref = _load(reference_dir, **session_kwargs)
    results: dict[str, Any] = {}
    for label, folder in (("artifact", artifact_dir), ("twin", twin_dir)):
        if folder is None:
            continue
        step(f"{label} against the fp32 export")
        ours = _load(folder, **session_kwargs)
        checks = parity_checks(ours, ref, text, rule)
        for window in held_out:
            ids = np.asarray([window], np.int64)
            mask, positions = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None, :]
            ref_logits, _ = ref.forward(ids, mask, positions, ref.empty_cache(1))
            our_logits, _ = ours.forward(ids, mask, positions, ours.empty_cache(1))
            checks.append(rule.compare(f"held-out prefill logits ({ids.shape[1]} tokens)", our_logits, ref_logits))
        summary = rule.pooled(checks)
        results[label] = {"checks": checks, "summary": summary, "passed": summary["passed"]}
    results["passed"] = all(result["passed"] for result in results.values())
    return results


def verify_checker_only(artifact_dir: Path, reason: str) -> dict[str, Any]:
    """An artifact this machine cannot run (bf16 on the CPU provider): onnx.checker only, and why."""
    return {"against": "the verified fp32 export", "checks": [_checker(artifact_dir / MODEL_FILE)],
            "skipped": reason, "passed": True}


def verify_optimized(artifact_dir: Path, reference_dir: Path, prompt: list[int], reference_tokens: list[int],
                     weights: str, profile: TargetProfile, progress: Callable | None = None,
                     **session_kwargs) -> dict[str, Any]:
    """An optimized artifact against the verified fp32 export in `reference_dir` (read, never written);
    `reference_tokens` are the export's greedy tokens from its own verification."""
    step = progress or (lambda message: None)
    started = time.perf_counter()
    tokens = profile.verify.greedy_tokens
    rule = comparison_rule(weights, profile)
    checks = [_checker(artifact_dir / MODEL_FILE)]
    step("onnxruntime load")
    ours, ref = _load(artifact_dir, **session_kwargs), _load(reference_dir, **session_kwargs)
    checks.append({"check": "onnxruntime load", "passed": True})
    step(f"greedy generation ({tokens} tokens)")
    our_tokens = ours.greedy(prompt, tokens)
    step("prefill, decode and batch comparison")
    # Score the prompt and the reference's own continuation: more positions than the prompt alone.
    checks += parity_checks(ours, ref, prompt + reference_tokens, rule)
    if hasattr(rule, "pooled"):
        checks.append(rule.pooled(checks))
    agree = next((i for i, (a, b) in enumerate(zip(our_tokens, reference_tokens)) if a != b), len(reference_tokens))
    greedy = {"reference": reference_tokens, "optimized": our_tokens, "identical": our_tokens == reference_tokens,
              "first_difference": agree}
    if rule.exact:
        checks.append({"check": f"greedy {tokens} tokens identical", "passed": greedy["identical"]})
    if ours.shares_kv_buffer:  # how apps run it: the same arithmetic, so the same tokens, exactly
        from edgecompress.runtimes.kv_steps import greedy_in_place

        step("greedy generation with the KV cache written in place")
        in_place = greedy_in_place(ours, prompt, tokens)
        greedy["kv_cache_in_place"] = in_place
        checks.append({"check": "greedy tokens with the KV cache written in place identical",
                       "passed": in_place == our_tokens})
    level = accuracy_level_agreement(artifact_dir, prompt, our_tokens, step, **session_kwargs)
    if level is not None:
        greedy["accuracy_level_0"] = level
    report = {"against": "the verified fp32 export", "weights": weights, "checks": checks, "greedy": greedy,
              "seconds": round(time.perf_counter() - started, 2)}
    return _raise_if_failed(report, rule, "optimized artifact failed verification")


def accuracy_level_agreement(artifact_dir: Path, prompt: list[int], tokens_at_level: list[int], step: Callable,
                             **session_kwargs) -> dict[str, Any] | None:
    """The artifact's greedy tokens again with every MatMulNBits at accuracy level 0 (fp32 activations), against
    its own level (4: int8 activations, onnxruntime's fast CPU kernel, reported to change greedy tokens on some
    models). None when the graph has no MatMulNBits above level 0. The level-0 copy of model.onnx sits in a
    temporary folder inside the (staging) artifact with its weights and op library hard-linked (copied where the
    file system cannot link): onnxruntime refuses external data outside the model's folder, symlinks included."""
    import os
    import shutil
    import tempfile

    import onnx

    from edgecompress.contract import CUSTOM_OPS_LIBRARY_FILE, DATA_FILE

    model = onnx.load(str(artifact_dir / MODEL_FILE), load_external_data=False)
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    levels = sorted({a.i for node in nbits for a in node.attribute if a.name == "accuracy_level"})
    if not levels or levels == [0]:
        return None
    step(f"greedy generation at accuracy level 0 (the artifact's: {', '.join(map(str, levels))})")
    for node in nbits:
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = 0
    with tempfile.TemporaryDirectory(prefix=".accuracy-level-0-", dir=artifact_dir) as scratch:
        folder = Path(scratch)
        onnx.save(model, str(folder / MODEL_FILE))
        for name in (DATA_FILE, CUSTOM_OPS_LIBRARY_FILE):
            if (artifact_dir / name).is_file():
                try:
                    os.link(artifact_dir / name, folder / name)
                except OSError:
                    shutil.copy2(artifact_dir / name, folder / name)
        level0 = _load(folder, **session_kwargs).greedy(prompt, len(tokens_at_level))
    first = next((i for i, (a, b) in enumerate(zip(level0, tokens_at_level)) if a != b), len(tokens_at_level))
    return {"levels": levels, "tokens": level0, "identical": level0 == tokens_at_level, "first_difference": first}
