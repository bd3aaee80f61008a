"""Verification of an optimized artifact (fused graph, int8/int4 weights) against its verified fp32 export.

The fp32 export was already checked against PyTorch, so this compares onnxruntime with onnxruntime:
the same prefill, cached decode step, left-padded batch and greedy run as `verify.verify`. A fused fp32
graph must match within the fp32 tolerances. Low-bit weights change the logits by design, so for them
the checks measure how much (mean KL divergence of the next-token distributions, top-1 agreement) and
fail only past the profile's bounds; the greedy run is reported, not required to be identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import VerificationError
from edgecompress.verify import Tolerances, _compare, left_padded_batch

# Defaults when a profile has no [verify.<format>] section; measured on smollm2-135m (see README).
DEFAULT_BOUNDS = {"int8": (0.02, 0.9), "int4": (0.2, 0.7)}


@dataclass
class LowBitBounds:
    max_mean_kl: float
    min_top1_agreement: float

    @classmethod
    def from_profile(cls, profile: dict[str, Any], weights: str) -> "LowBitBounds":
        kl, top1 = DEFAULT_BOUNDS[weights]
        section = profile.get("verify", {}).get(weights, {})
        return cls(float(section.get("max_mean_kl", kl)), float(section.get("min_top1_agreement", top1)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    scores = logits.astype(np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))


def _measure(name: str, ours: np.ndarray, ref: np.ndarray, bounds: LowBitBounds) -> dict[str, Any]:
    log_p, log_q = _log_softmax(ref), _log_softmax(ours)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    return {
        "check": name,
        "max_abs_diff": float(np.max(np.abs(ours.astype(np.float64) - ref))),
        "mean_kl": kl,
        "top1_agreement": top1,
        "bounds": {"max_mean_kl": bounds.max_mean_kl, "min_top1_agreement": bounds.min_top1_agreement},
        "passed": kl <= bounds.max_mean_kl and top1 >= bounds.min_top1_agreement,
    }


def _onnx_checker(model_file: Path) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    # onnxruntime's fused SimplifiedLayerNormalization lives in the ai.onnx domain but only onnxruntime
    # defines it, so onnx.checker rejects any graph that has it; the fp32 export was checked before.
    default_domain = {node.op_type for node in proto.graph.node if node.domain in ("", "ai.onnx")}
    ort_only = sorted(default_domain & {"SimplifiedLayerNormalization"})
    if ort_only:
        reason = f"onnxruntime-only ops in the ai.onnx domain: {', '.join(ort_only)}"
        return {"check": "onnx.checker", "skipped": reason, "passed": True}
    try:
        onnx.checker.check_model(str(model_file))
    except Exception as exc:
        raise VerificationError(f"onnx.checker rejected the optimized model: {str(exc).splitlines()[0]}") from None
    return {"check": "onnx.checker", "passed": True}


def verify_against_reference(
    artifact_dir: Path,
    reference_dir: Path,
    prompt: list[int],
    weights: str,
    profile: dict[str, Any],
    progress=None,
) -> dict[str, Any]:
    """Compare artifact_dir with the fp32 reference_dir; raises VerificationError past the bounds."""
    from edgecompress.runtimes.decoder import OrtDecoder
    from edgecompress.runtimes.session import RuntimeLoadError

    started = time.perf_counter()
    exact = weights == "fp32"
    tol = Tolerances.from_profile(profile)
    bounds = None if exact else LowBitBounds.from_profile(profile, weights)

    def compare(name: str, ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
        return _compare(name, ours, ref, tol) if exact else _measure(name, ours, ref, bounds)

    def step(message: str) -> None:
        if progress:
            progress(message)

    checks = [_onnx_checker(artifact_dir / "model.onnx")]
    step("onnxruntime load")
    try:
        ours, ref = OrtDecoder(artifact_dir), OrtDecoder(reference_dir)
    except RuntimeLoadError as exc:
        raise VerificationError(str(exc)) from None
    checks.append({"check": "onnxruntime load", "passed": True})

    step(f"greedy generation ({tol.greedy_tokens} tokens)")
    ref_tokens = ref.greedy(prompt, tol.greedy_tokens)
    our_tokens = ours.greedy(prompt, tol.greedy_tokens)

    step("prefill, decode and batch comparison")
    # Score the prompt and the reference's own continuation: more positions than the prompt alone.
    text = prompt + ref_tokens
    ids = np.asarray([text], np.int64)
    n = ids.shape[1]
    mask, positions = np.ones_like(ids), np.arange(n, dtype=np.int64)[None, :]
    ref_logits, ref_past = ref.forward(ids, mask, positions, ref.empty_cache(1))
    our_logits, _ = ours.forward(ids, mask, positions, ours.empty_cache(1))
    checks.append(compare(f"prefill logits ({n} tokens)", our_logits[0], ref_logits[0]))

    next_id = np.asarray([[int(np.argmax(ref_logits[0, -1]))]], np.int64)
    step_mask, step_pos = np.ones((1, n + 1), np.int64), np.asarray([[n]], np.int64)
    ref_step, _ = ref.forward(next_id, step_mask, step_pos, ref_past)
    our_step, _ = ours.forward(next_id, step_mask, step_pos, ref_past)
    checks.append(compare(f"decode logits (1 token, {n} past)", our_step[0], ref_step[0]))

    pad, (batch_ids, batch_mask, batch_pos) = left_padded_batch(text)
    ref_b, _ = ref.forward(batch_ids, batch_mask, batch_pos, ref.empty_cache(2))
    our_b, _ = ours.forward(batch_ids, batch_mask, batch_pos, ours.empty_cache(2))
    checks.append(compare("padded batch prefill logits (2 rows)", our_b[:, pad:], ref_b[:, pad:]))

    agree = next((i for i, (a, b) in enumerate(zip(our_tokens, ref_tokens)) if a != b), len(ref_tokens))
    greedy = {
        "reference": ref_tokens, "optimized": our_tokens, "identical": our_tokens == ref_tokens, "first_difference": agree,
    }
    if exact:
        checks.append({"check": f"greedy {tol.greedy_tokens} tokens identical", "passed": our_tokens == ref_tokens})
    report = {
        "against": "the verified fp32 export",
        "weights": weights,
        "checks": checks,
        "greedy": greedy,
        "seconds": round(time.perf_counter() - started, 2),
        "passed": all(check["passed"] for check in checks),
    }
    if not report["passed"]:
        failed = next(check for check in checks if not check["passed"])
        detail = ""
        if "bounds" in failed:
            detail = (f" (mean KL {failed['mean_kl']:.3g}, top-1 agreement {failed['top1_agreement']:.2f};"
                      f" bounds {failed['bounds']})")
        elif "bound" in failed:
            detail = f" (max |diff| {failed['max_abs_diff']:.3g} > {failed['bound']:.3g})"
        raise VerificationError(f"optimized artifact failed verification: {failed['check']}{detail}", report)
    return report
