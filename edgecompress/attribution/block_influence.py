"""Layer redundancy scores from the residual stream, taken with hooks on the decoder layers.

- Block Influence (ShortGPT, used by GRASP): BI_l = mean over all tokens of 1 - cos(h_in, h_out).
  Hooks give the pre-norm output of the last layer, unlike HF's `hidden_states[-1]` (bug B9).
- Angular distance (Gromov et al.): d(l, n) = arccos(cos(h_l[last], h_{l+n}[last])) / pi,
  averaged over sequences; the contiguous block [l, l+n) with the smallest d is the most redundant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgecompress.attribution.layer_walker import LayerStream, decoder_layers, record_stream


@dataclass
class LayerScores:
    block_influence: list[float]  # per decoder layer
    last_token_states: torch.Tensor  # [n_sequences, L + 1, d]: h_0..h_L at the last position
    stream: LayerStream  # what the same forward pass recorded, reused by attribution

    def lowest_bi(self, count: int, exclude: tuple[int, ...] = ()) -> list[int]:
        """The `count` layers with the smallest BI, lowest first (ties by index)."""
        order = sorted(
            (i for i in range(len(self.block_influence)) if i not in exclude),
            key=lambda i: (self.block_influence[i], i),
        )
        return order[:count]

    def angular_distances(self, block_size: int) -> list[float]:
        """d(l, block_size) for every start l in 0..L-block_size."""
        states = self.last_token_states
        n_layers = states.shape[1] - 1
        distances = []
        for start in range(n_layers - block_size + 1):
            cos = F.cosine_similarity(states[:, start], states[:, start + block_size], dim=-1)
            distances.append(float((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean()))
        return distances

    def best_block(self, block_size: int, exclude: tuple[int, ...] = ()) -> list[int]:
        """Contiguous block of `block_size` layers with the smallest angular distance, none of them in
        `exclude` (ties: the lowest start)."""
        distances = self.angular_distances(block_size)
        starts = [s for s in range(len(distances)) if not any(s <= e < s + block_size for e in exclude)]
        start = min(starts, key=lambda s: (distances[s], s))
        return list(range(start, start + block_size))


def layer_scores(
    model, input_ids: torch.Tensor, batch_size: int = 1, progress=None, keep_inputs: bool = False,
    keep_dtype: torch.dtype | None = None,
) -> LayerScores:
    """One no-grad forward pass: BI of every layer, last-token states, and the layer stream
    (with every layer's input when `keep_inputs`)."""
    n_layers = len(decoder_layers(model))
    bi_sum = torch.zeros(n_layers, dtype=torch.float64)
    token_count = torch.zeros(n_layers, dtype=torch.float64)
    last_states: list[list[torch.Tensor]] = []  # per batch: L + 1 tensors [b, d]

    def on_layer(index, h_in, h_out):
        if index == 0:
            last_states.append([])
        # Row-wise cosine: O(T) memory (the official code builds a T x T matrix, bug B8).
        cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        cos = torch.nan_to_num(cos, nan=0.5)
        bi_sum[index] += float((1.0 - cos).double().sum())
        token_count[index] += cos.numel()
        last_states[-1].append(h_in[:, -1].float().cpu().clone())  # not a view: it would keep h_in alive
        if index == n_layers - 1:
            last_states[-1].append(h_out[:, -1].float().cpu().clone())

    stream = record_stream(
        model, input_ids, batch_size=batch_size, on_layer=on_layer, progress=progress, keep_inputs=keep_inputs,
        keep_dtype=keep_dtype,
    )
    states = torch.cat([torch.stack(per_batch, dim=1) for per_batch in last_states], dim=0)
    return LayerScores(
        block_influence=(bi_sum / token_count).tolist(),
        last_token_states=states,
        stream=stream,
    )


def block_influence(model, input_ids: torch.Tensor, batch_size: int = 1) -> list[float]:
    """BI of each decoder layer on `input_ids` [n, T]."""
    return layer_scores(model, input_ids, batch_size).block_influence
