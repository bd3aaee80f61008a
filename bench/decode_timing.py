"""Decode time of several artifacts on one machine, interleaved: a 512-token prefill (untimed), then one token per
step through the KV cache, timed per step; the order rotates every round so drift and load spread evenly. Shared
by bench/accuracy_level.py and bench/weight_formats.py."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def decode_times(folders: dict[str, Path], threads: int, steps: int, repeats: int) -> tuple[dict, dict]:
    """(median ms/token per label, every round's ms/token per label); round 0 warms up and is not kept."""
    from edgecompress.runtimes.decoder import OrtDecoder

    decoders = {label: OrtDecoder(folder, threads=threads) for label, folder in folders.items()}
    ids = np.random.default_rng(0).integers(100, 40000, (1, 512)).astype(np.int64)
    samples: dict[str, list[float]] = {label: [] for label in folders}
    order = list(folders)
    for repeat in range(repeats + 1):
        for label in order[repeat % len(order):] + order[:repeat % len(order)]:
            decoder = decoders[label]
            logits, past = decoder.forward(ids, np.ones_like(ids), np.arange(512)[None, :], decoder.empty_cache(1),
                                           last_only=True)
            token = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
            started = time.perf_counter()
            for step in range(steps):
                length = 512 + step
                logits, past = decoder.forward(token, np.ones((1, length + 1), dtype=np.int64),
                                               np.array([[length]], dtype=np.int64), past)
                token = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
            if repeat:
                samples[label].append((time.perf_counter() - started) * 1e3 / steps)
    return {label: round(statistics.median(values), 3) for label, values in samples.items()}, samples


def add_arguments(parser) -> None:
    """The options the decode-timing benches share: evaluation windows and the decode loop's size."""
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows for the perplexity")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
