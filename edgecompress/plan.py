"""The compression plan: the only thing that crosses from PyTorch attribution to the ONNX passes.

On disk a plan is a folder with
- `plan.json`: method, settings, per decoder layer keep|replace|remove, per Linear of a replaced
  layer its rank and kept singular indices, the scores that led there, the parameter accounting
  and the content hashes (model weights, calibration data, settings);
- `factors.safetensors`: fp32 tensors `<module>.A` [rank, in], `<module>.B` [out, rank] and
  `<module>.bias` [out] (only when the Linear has a bias), with y = (x @ A.T) @ B.T + bias; a structured
  Linear (`structure` monarch or blast, `blocks` b) stores `<module>.W1`/`.W2` or `.U`/`.S`/`.V` instead, in
  the layouts of `kernels/reference.py` (y = MonarchMatMul / BlastMatMul(x, ...) + bias). Plans written
  before structures existed have no `structure` field and read as low-rank;
- with a factored tied embedding (`embedding` in plan.json, absent or null otherwise), `<embed>.exact` [K, d]
  (the rows of the K exact tokens), `<embed>.a` [V-K, r], `<embed>.b` [r, d] (the other rows ≈ a·b) and
  `<embed>.order` [V] int64 (token ids: the K exact ones first, then the rest ascending; an index, not parameters).

This module is pure data plus the parameter arithmetic used to turn a ratio into a layer count;
it needs numpy and safetensors but not torch (only `model_weights_hash` imports torch).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgecompress.contract import FACTORS_FILE, PLAN_FILE
from edgecompress.errors import EdgeCompressError
from edgecompress.options import check_ratio
from edgecompress.structures import LOWRANK, STRUCTURES

PLAN_FORMAT = "edgecompress.plan"
PLAN_VERSION = 1
LAYER_ACTIONS = ("keep", "replace", "remove")
# A factored tied embedding's tensors (`<embed module>.<name>`).
EMBEDDING_FACTORS = ("exact", "a", "b", "order")


# ---------------------------------------------------------------- parameter arithmetic


def low_rank_rank(out_features: int, in_features: int, rho: float) -> int:
    """GRASP/SVD-LLM rank: k = floor(m*n*(1-rho)/(m+n)), clamped to [1, min(m, n)]."""
    m, n = out_features, in_features
    k = math.floor(m * n * (1.0 - rho) / (m + n))
    return max(1, min(k, m, n))


def low_rank_saving(out_features: int, in_features: int, rank: int) -> int:
    """Parameters saved by storing an m x n weight as B [m, k] @ A [k, n] (bias unchanged)."""
    return out_features * in_features - rank * (out_features + in_features)


def count_for_ratio(savings_in_order: list[int], dense_total: int, ratio: float, rounding: str = "nearest") -> int:
    """How many of the candidates (in the order they would be taken) reach `ratio` of `dense_total`.

    rounding="at_least": the smallest count whose saving reaches the target;
    rounding="nearest": the count whose achieved ratio is closest to the target (ties go up),
    never zero. A target beyond what all candidates together save is unreachable.
    """
    ratio = check_ratio(ratio)
    target = ratio * dense_total
    cumulative, running = [0], 0
    for saving in savings_in_order:
        running += saving
        cumulative.append(running)
    if cumulative[-1] < target:
        raise EdgeCompressError(
            f"ratio {ratio:.3f} is out of reach: this method removes at most "
            f"{cumulative[-1] / dense_total:.3f} of the parameters"
        )
    at_least = next(i for i, saved in enumerate(cumulative) if saved >= target)
    if rounding == "at_least":
        return max(1, at_least)
    if rounding != "nearest":
        raise EdgeCompressError(f"unknown rounding {rounding!r}: use nearest or at_least")
    below = max(1, at_least - 1)
    if abs(cumulative[below] - target) < abs(cumulative[at_least] - target):
        return below
    return max(1, at_least)


def uniform_rho_for_ratio(
    shapes: list[tuple[int, int]], dense_total: int, ratio: float, tolerance: float = 1e-6
) -> float:
    """Smallest per-matrix rho (same for every m x n in `shapes`) whose saving reaches `ratio`."""
    ratio = check_ratio(ratio)
    target = ratio * dense_total

    def saving(rho: float) -> int:
        return sum(low_rank_saving(m, n, low_rank_rank(m, n, rho)) for m, n in shapes)

    if saving(1.0) < target:
        raise EdgeCompressError(
            f"ratio {ratio:.3f} is out of reach: low-rank factors of these matrices remove at most "
            f"{saving(1.0) / dense_total:.3f} of the parameters"
        )
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        if saving(middle) >= target:
            high = middle
        else:
            low = middle
    return high


def embedding_params(vocab: int, hidden: int, rank: int, exact_tokens: int) -> int:
    """Parameters of a factored table: K exact rows x d, a [V-K, r], b [r, d] (the order index is not counted)."""
    return exact_tokens * hidden + (vocab - exact_tokens) * rank + rank * hidden


def embedding_saving(vocab: int, hidden: int, rank: int, exact_tokens: int) -> int:
    """Parameters a factored tied table saves against the dense V x d (counted once: it is tied)."""
    return vocab * hidden - embedding_params(vocab, hidden, rank, exact_tokens)


def embedding_rank_for_share(vocab: int, hidden: int, total_params: int, share: float, exact_tokens: int) -> int:
    """The largest rank whose factored table saves at least `share` of `total_params`:
    r = floor((V·d − s·|θ| − K·d) / ((V − K) + d))."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        raise EdgeCompressError(f"embedding share must be a fraction strictly between 0 and 1, got {share!r}")
    if not (isinstance(exact_tokens, int) and 1 <= exact_tokens < vocab):
        raise EdgeCompressError(f"exact tokens must be between 1 and {vocab - 1}, got {exact_tokens!r}")
    rank = math.floor((vocab * hidden - share * total_params - exact_tokens * hidden) / (vocab - exact_tokens + hidden))
    if rank < 1:
        most = embedding_saving(vocab, hidden, 1, exact_tokens) / total_params
        raise EdgeCompressError(f"embedding share {share:.3f} is out of reach: with {exact_tokens} exact tokens "
                                f"the factored table removes at most {most:.3f} of the parameters")
    return min(rank, vocab - exact_tokens, hidden)


def _validate_embedding(embedding: "EmbeddingPlan", factors: dict) -> None:
    v, d, r, k = embedding.vocab, embedding.hidden, embedding.rank, embedding.exact_tokens
    if not (1 <= k < v and 1 <= r <= min(v - k, d)):
        raise EdgeCompressError(f"plan embedding: rank {r} with {k} exact tokens does not fit a {v} x {d} table")
    if (embedding.params_before, embedding.params_after) != (v * d, embedding_params(v, d, r, k)):
        raise EdgeCompressError("plan embedding: its parameter counts disagree with its shapes")
    if not factors:
        return
    names = [embedding.factor_key(name) for name in EMBEDDING_FACTORS]
    missing = [name for name in names if name not in factors]
    if missing:
        raise EdgeCompressError(f"plan factors miss {', '.join(missing)}")
    if any(tuple(factors[name].shape) != shape for name, shape in zip(names, embedding.factor_shapes())):
        raise EdgeCompressError(f"plan factors of {embedding.module} have the wrong shape")
    order = factors[embedding.factor_key("order")]
    if order.dtype.kind not in "iu" or not (np.sort(order) == np.arange(v)).all():
        raise EdgeCompressError(f"plan factor {embedding.factor_key('order')} is not a permutation of the vocabulary")


def _validate_linear(linear: "LinearPlan", factors: dict) -> None:
    if linear.structure not in STRUCTURES:
        raise EdgeCompressError(f"plan {linear.module}: unknown structure {linear.structure!r}")
    if not STRUCTURES[linear.structure].blocked:
        if len(linear.kept_indices) != linear.rank:
            raise EdgeCompressError(f"plan {linear.module}: rank and kept indices disagree")
    elif not (isinstance(linear.blocks, int) and linear.blocks >= 1 and linear.in_features % linear.blocks == 0
              and linear.out_features % linear.blocks == 0):
        raise EdgeCompressError(f"plan {linear.module}: {linear.blocks!r} blocks do not divide its "
                                f"{linear.out_features} x {linear.in_features} weight")
    if not factors:
        return
    names = [f"{linear.module}.{name}" for name in linear.factor_names]
    missing = [name for name in names if name not in factors]
    if missing:
        raise EdgeCompressError(f"plan factors miss {', '.join(missing)}")
    if any(tuple(factors[name].shape) != shape for name, shape in zip(names, linear.factor_shapes())):
        raise EdgeCompressError(f"plan factors of {linear.module} have the wrong shape")


# ---------------------------------------------------------------- hashes


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_weights_hash(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- the plan


@dataclass
class LinearPlan:
    """One Linear of a replaced layer: W [out, in] becomes B [out, rank] @ A [rank, in] (low-rank), or Monarch /
    BLAST factors with `blocks` blocks (rank: Monarch's channels R, BLAST's r; kept_indices empty)."""

    name: str  # relative to the decoder layer, e.g. "self_attn.q_proj"
    module: str  # full module name, e.g. "model.layers.12.self_attn.q_proj"
    in_features: int
    out_features: int
    rank: int
    kept_indices: list[int]  # indices of kept singular groups in the basis (descending sigma)
    has_bias: bool = False
    action: str = "low_rank"
    basis: str = "weight"  # "weight": SVD of W; "whitened": SVD of W L (SVD-LLM)
    scores: dict = field(default_factory=dict)  # summary of the group scores
    structure: str = LOWRANK.name  # a key of edgecompress.structures.STRUCTURES
    blocks: int | None = None  # b, for monarch and blast
    params: int | None = None  # factor parameters (bias excluded); None in plans written before structures

    @property
    def factor_names(self) -> tuple[str, ...]:
        return STRUCTURES[self.structure].factor_names

    def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes its factors must have, in `factor_names` order."""
        return STRUCTURES[self.structure].factor_shapes(self.out_features, self.in_features, self.rank, self.blocks)


@dataclass
class LayerPlan:
    index: int
    name: str  # e.g. "model.layers.12"
    action: str  # keep | replace | remove
    linears: list[LinearPlan] = field(default_factory=list)


@dataclass
class EmbeddingPlan:
    """The tied embedding / lm_head table E [V, d] as K exact rows plus a·b for the other V−K rows (one set
    of tensors for both uses). Fitted by attribution/embedding.py; rank from the budget share."""

    module: str  # the embedding, e.g. "model.embed_tokens"
    head: str  # the tied head, e.g. "lm_head"
    vocab: int
    hidden: int
    rank: int
    exact_tokens: int  # K
    share: float | None  # target share of all parameters removed by the table (None: rank given)
    params_before: int  # V·d (the tied table counted once)
    params_after: int  # K·d + (V−K)·r + r·d
    index_bytes: int  # the int64 token order, stored beside the factors (not parameters)
    basis: str = "frequency-weighted, output-whitened"
    scores: dict = field(default_factory=dict)

    @property
    def saving(self) -> int:
        return self.params_before - self.params_after

    def factor_key(self, name: str) -> str:
        return f"{self.module}.{name}"

    def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of exact, a, b, order."""
        v, d, r, k = self.vocab, self.hidden, self.rank, self.exact_tokens
        return (k, d), (v - k, r), (r, d), (v,)


@dataclass
class CompressionPlan:
    method: str
    settings: dict
    layers: list[LayerPlan]
    scores: dict  # {"block_influence": [...], ...}
    params: dict  # dense_total, after, removed, achieved_ratio, target_ratio
    model_hash: str
    calibration: dict  # CalibrationSet.describe()
    model: dict = field(default_factory=dict)  # architecture, num_hidden_layers, layer_prefix
    # name -> np.float32 array, the embedding's order int64 (not in JSON)
    factors: dict = field(default_factory=dict, repr=False)
    embedding: EmbeddingPlan | None = None  # the factored tied embedding, when the plan has one

    # ------------------------------------------------------------ derived views

    @property
    def plan_hash(self) -> str:
        """Content hash of what the plan was made from: model weights + calibration + settings."""
        return sha256_json(
            {
                "method": self.method,
                "settings": self.settings,
                "model_hash": self.model_hash,
                "calibration_hash": self.calibration.get("hash"),
            }
        )

    def layers_with(self, action: str) -> list[int]:
        return [layer.index for layer in self.layers if layer.action == action]

    @property
    def removed_layers(self) -> list[int]:
        return self.layers_with("remove")

    @property
    def replaced_layers(self) -> list[int]:
        return self.layers_with("replace")

    def low_rank_linears(self) -> list[LinearPlan]:
        return [linear for layer in self.layers if layer.action == "replace" for linear in layer.linears]

    # ------------------------------------------------------------ checks

    def verify_hash(self, model_hash: str) -> None:
        if model_hash != self.model_hash:
            raise EdgeCompressError(
                f"plan was made for model weights {self.model_hash[:12]}, "
                f"this model is {model_hash[:12]}: re-run attribution or pass the matching model"
            )

    def validate(self) -> None:
        """Structural checks: actions, ranks and factor shapes agree."""
        for layer in self.layers:
            if layer.action not in LAYER_ACTIONS:
                raise EdgeCompressError(f"plan layer {layer.index}: unknown action {layer.action!r}")
            if layer.action != "replace":
                continue
            for linear in layer.linears:
                _validate_linear(linear, self.factors)
        if self.embedding is not None:
            _validate_embedding(self.embedding, self.factors)

    # ------------------------------------------------------------ (de)serialization

    def to_json_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "method": self.method,
            "settings": self.settings,
            "plan_hash": self.plan_hash,
            "model_hash": self.model_hash,
            "model": self.model,
            "calibration": self.calibration,
            "params": self.params,
            "scores": self.scores,
            "layers": [asdict(layer) for layer in self.layers],
            "embedding": None if self.embedding is None else asdict(self.embedding),
            "factors_file": FACTORS_FILE,
        }

    @classmethod
    def from_json_dict(cls, data: dict, factors: dict | None = None) -> "CompressionPlan":
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise EdgeCompressError(f"not an edgecompress plan (version {PLAN_VERSION})")
        try:
            layers = [
                LayerPlan(
                    index=layer["index"],
                    name=layer["name"],
                    action=layer["action"],
                    linears=[LinearPlan(**linear) for linear in layer["linears"]],
                )
                for layer in data["layers"]
            ]
            embedding = EmbeddingPlan(**data["embedding"]) if data.get("embedding") else None
        except (TypeError, KeyError) as exc:  # a field this version does not know, or one missing
            raise EdgeCompressError(f"plan.json has a layer this version cannot read: {exc}") from exc
        plan = cls(
            method=data["method"],
            settings=data["settings"],
            layers=layers,
            scores=data["scores"],
            params=data["params"],
            model_hash=data["model_hash"],
            calibration=data["calibration"],
            model=data.get("model", {}),
            embedding=embedding,
            factors=factors or {},
        )
        if data.get("plan_hash") != plan.plan_hash:
            raise EdgeCompressError("plan.json is inconsistent: its plan_hash does not match its content")
        return plan

    def save(self, directory) -> Path:
        from safetensors.numpy import save_file

        self.validate()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json_dict(), indent=1, sort_keys=True)
        (directory / PLAN_FILE).write_text(text + "\n", encoding="utf-8")
        save_file({name: self.factors[name] for name in sorted(self.factors)}, str(directory / FACTORS_FILE))
        return directory

    @classmethod
    def load(cls, directory) -> "CompressionPlan":
        from safetensors.numpy import load_file

        directory = Path(directory)
        plan_path = directory / PLAN_FILE
        if not plan_path.is_file():
            raise EdgeCompressError(f"no {PLAN_FILE} in {directory}")
        try:
            data = json.loads(plan_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EdgeCompressError(f"{plan_path} is not valid JSON: {exc}") from exc
        factors_path = directory / FACTORS_FILE
        factors = load_file(str(factors_path)) if factors_path.is_file() else {}
        plan = cls.from_json_dict(data, factors)
        plan.validate()
        return plan
