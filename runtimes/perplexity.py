"""WikiText-2 perplexity of an artifact through onnxruntime.

Protocol (the usual one for LLM compression papers): tokenize the whole text once, cut the ids into
non-overlapping windows of `seq_len` tokens (the tail that does not fill a window is dropped), run each
window as a fresh prefill, and average the next-token negative log-likelihood over every scored token
of every window. Perplexity = exp(mean NLL).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgecompress.runtimes import text_sources
from edgecompress.runtimes.artifact_files import artifact_folder, artifact_providers, load_tokenizer
from edgecompress.runtimes.decoder import OrtDecoder
from edgecompress.runtimes.errors import ArtifactRuntimeError

NO_DATA_HINT = (
    f"pass --data FILE or --data hf:DATASET[:CONFIG]:SPLIT[:FIELD], or set {text_sources.DATA_ENV} to a folder "
    f"holding {text_sources.WIKITEXT_FILES[text_sources.EVALUATION]}"
)


def evaluation_text(data: str | Path | None) -> text_sources.TextSource:
    """The text to score: `data`, else the documented defaults; one clear error when there is none."""
    found = text_sources.resolve(data, text_sources.EVALUATION)
    if isinstance(found, text_sources.NoText):
        raise ArtifactRuntimeError(f"{found.reason}; {NO_DATA_HINT}")
    return found


@dataclass
class PerplexitySettings:
    data: str
    data_sha256: str
    seq_len: int = 512
    limit: int | None = None
    batch_size: int = 1
    add_special_tokens: bool = False
    data_origin: str = "user"  # or EDGECOMPRESS_DATA, datasets (runtimes.text_sources)


def token_windows(ids: list[int] | np.ndarray, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, seq_len]; the incomplete tail is dropped."""
    ids = np.asarray(ids, dtype=np.int64)
    count = len(ids) // seq_len
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seq_len].reshape(count, seq_len)


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """NLL of ids[:, 1:] under logits[:, :-1]; float64 log-sum-exp so 512×vocab sums stay exact."""
    scores = logits[:, :-1].astype(np.float64)
    targets = ids[:, 1:]
    peak = scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(scores - peak).sum(axis=-1)) + peak[..., 0]
    picked = np.take_along_axis(scores, targets[..., None], axis=-1)[..., 0]
    return log_norm - picked


def _score_windows(decoder: OrtDecoder, windows: np.ndarray, batch_size: int) -> tuple[float, int, list[float]]:
    """Sum of next-token NLL, tokens scored, and each window's mean NLL; each batch a fresh prefill."""
    total_nll, scored, window_nll = 0.0, 0, []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        mask = np.ones_like(batch)
        positions = np.broadcast_to(np.arange(windows.shape[1], dtype=np.int64), batch.shape)
        logits, _ = decoder.forward(batch, mask, positions, decoder.empty_cache(len(batch)))
        nll = next_token_nll(logits, batch)
        total_nll += float(nll.sum())
        scored += nll.size
        window_nll += [float(v) for v in nll.mean(axis=1)]
    return total_nll, scored, window_nll


def perplexity(
    artifact,
    data: "str | Path | text_sources.TextSource | None" = None,
    seq_len: int = 512,
    limit: int | None = None,
    batch_size: int = 1,
    decoder: OrtDecoder | None = None,
    **session_kwargs,
) -> dict:
    """Perplexity of `artifact` on `data` (a file, an hf: spec, an already read TextSource, or None for the
    defaults of runtimes.text_sources); returns the value with its settings and timings."""
    if seq_len < 2:
        raise ArtifactRuntimeError("--seq-len must be at least 2 (one token predicts the next)")
    if limit is not None and limit < 1:
        raise ArtifactRuntimeError("--limit must be at least 1 window")
    if batch_size < 1:
        raise ArtifactRuntimeError("the batch size must be at least 1")
    folder = artifact_folder(artifact)
    source = data if isinstance(data, text_sources.TextSource) else evaluation_text(data)

    started = time.perf_counter()
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(source.text, add_special_tokens=False).ids
    windows = token_windows(ids, seq_len, limit)
    if len(windows) == 0:
        raise ArtifactRuntimeError(
            f"'{source.description}' has {len(ids)} tokens: fewer than one window of {seq_len}"
        )
    tokenize_s = time.perf_counter() - started

    warnings: list[str] = []
    if decoder is None:
        session_kwargs["providers"], warnings = artifact_providers(folder, session_kwargs.get("providers"))
        decoder = OrtDecoder(folder, **session_kwargs)
    started = time.perf_counter()
    total_nll, scored, window_nll = _score_windows(decoder, windows, batch_size)
    run_s = time.perf_counter() - started

    mean_nll = total_nll / scored
    settings = PerplexitySettings(
        data=source.description, data_sha256=source.sha256, seq_len=seq_len, limit=limit, batch_size=batch_size,
        data_origin=source.origin,
    )
    return {
        "artifact": str(folder),
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "windows": len(windows),
        "windows_available": len(ids) // seq_len,
        "windows_sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(),  # the exact token ids scored
        "tokens_scored": scored,
        "text_tokens": len(ids),
        "window_nll": window_nll,
        "settings": asdict(settings),
        "seconds": {"tokenize": round(tokenize_s, 3), "evaluate": round(run_s, 3)},
        "tokens_per_second": round(len(windows) * seq_len / run_s, 1),
        "providers": decoder.session.get_providers(),
        "warnings": warnings,
    }
