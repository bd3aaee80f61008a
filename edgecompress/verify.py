"""Verification, a stage of every build: the artifact must be valid ONNX, load in onnxruntime,
reproduce PyTorch's logits for a prefill and a cached decode step, and generate the same greedy tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import VerificationError

DEFAULT_PROMPT = "Explain in one sentence why the sky is blue."


@dataclass
class Tolerances:
    """Logits may differ by at most atol + rtol * max|reference logit| (float rounding across kernels)."""

    atol: float = 1e-3
    rtol: float = 1e-4
    greedy_tokens: int = 16

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> "Tolerances":
        section = profile.get("verify", {})
        return cls(
            atol=float(section.get("logits_atol", cls.atol)),
            rtol=float(section.get("logits_rtol", cls.rtol)),
            greedy_tokens=int(section.get("greedy_tokens", cls.greedy_tokens)),
        )


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


def _compare(name: str, ours: np.ndarray, ref: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    bound = tol.atol + tol.rtol * float(np.max(np.abs(ref)))
    same_argmax = bool(np.array_equal(ours.argmax(-1), ref.argmax(-1)))
    return {
        "check": name,
        "max_abs_diff": diff,
        "bound": bound,
        "argmax_equal": same_argmax,
        "passed": diff <= bound and same_argmax,
    }


def verify(artifact_dir: Path, model: Any, tokenizer: Any, tol: Tolerances, progress=None) -> dict[str, Any]:
    """Run every check; returns the report section. Raises VerificationError if any check fails."""
    import onnx

    from edgecompress.runtimes.decoder import OrtDecoder
    from edgecompress.runtimes.session import RuntimeLoadError

    started = time.perf_counter()
    report: dict[str, Any] = {"tolerances": {"logits_atol": tol.atol, "logits_rtol": tol.rtol}, "checks": []}
    model_file = artifact_dir / "model.onnx"

    def step(message: str) -> None:
        if progress:
            progress(message)

    step("onnx.checker")
    try:
        onnx.checker.check_model(str(model_file))  # path-based: works past the 2 GB protobuf limit
    except Exception as exc:
        raise VerificationError(f"onnx.checker rejected the export: {str(exc).splitlines()[0]}") from None
    report["checks"].append({"check": "onnx.checker", "passed": True})

    step("onnxruntime load")
    try:
        decoder = OrtDecoder(artifact_dir)
    except RuntimeLoadError as exc:
        raise VerificationError(str(exc)) from None
    report["checks"].append({"check": "onnxruntime load", "passed": True})

    torch_ref = TorchReference(model)
    kv_shape = (decoder.layout.kv_heads, decoder.layout.head_dim)
    prompt = prompt_ids(tokenizer)

    step("prefill and decode parity")
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    empty = decoder.empty_cache(1)
    ort_logits, ort_past = decoder.forward(ids, mask, positions, empty)
    ref_logits, ref_past = torch_ref.forward(ids, mask, positions, empty)
    report["checks"].append(_compare(f"prefill logits ({ids.shape[1]} tokens)", ort_logits, ref_logits, tol))

    # One cached decode step, both sides fed the same (reference) cache so only this step is compared.
    next_id = np.asarray([[int(np.argmax(ref_logits[0, -1]))]], np.int64)
    n = ids.shape[1]
    mask = np.ones((1, n + 1), np.int64)
    positions = np.asarray([[n]], np.int64)
    ort_step, _ = decoder.forward(next_id, mask, positions, ref_past)
    ref_step, _ = torch_ref.forward(next_id, mask, positions, ref_past)
    report["checks"].append(_compare(f"decode logits (1 token, {n} past)", ort_step, ref_step, tol))

    # Batched, left-padded prefill: exercises the attention mask and per-row position ids.
    pad, (batch_ids, batch_mask, batch_pos) = left_padded_batch(prompt)
    ort_b, _ = decoder.forward(batch_ids, batch_mask, batch_pos, decoder.empty_cache(2))
    ref_b, _ = torch_ref.forward(batch_ids, batch_mask, batch_pos, decoder.empty_cache(2))
    report["checks"].append(
        _compare("padded batch prefill logits (2 rows)", ort_b[:, pad:], ref_b[:, pad:], tol)
    )

    step(f"greedy generation ({tol.greedy_tokens} tokens)")
    ort_tokens = decoder.greedy(prompt, tol.greedy_tokens)
    ref_tokens = torch_ref.greedy(prompt, tol.greedy_tokens, kv_shape)
    report["greedy"] = {
        "prompt_tokens": len(prompt),
        "onnxruntime": ort_tokens,
        "pytorch": ref_tokens,
        "text": tokenizer.decode(ort_tokens, skip_special_tokens=False),
        "identical": ort_tokens == ref_tokens,
    }
    report["checks"].append({"check": f"greedy {tol.greedy_tokens} tokens identical", "passed": ort_tokens == ref_tokens})
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["passed"] = all(c["passed"] for c in report["checks"])
    if not report["passed"]:
        failed = next(c for c in report["checks"] if not c["passed"])
        detail = f" (max |diff| {failed['max_abs_diff']:.3g} > {failed['bound']:.3g})" if "bound" in failed else ""
        raise VerificationError(f"verification failed: {failed['check']}{detail}", report)
    return report
