"""What a user may ask a build for: every default and every check, in one place (the compression methods
and their own options: edgecompress/methods.py).

The CLI (`edgecompress build --help`) and the Python API (`edgecompress.build`) take their defaults
from here, and the pipeline validates a `BuildOptions` once, before loading
anything, with the checks below; `make_plan` and the graph passes call the same checks, so one option
always gets the same message. Torch-free and cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgecompress import structures
from edgecompress.errors import EdgeCompressError
from edgecompress.methods import AUTO, check_method, resolve_method

if TYPE_CHECKING:
    from edgecompress.profiles import TargetProfile


DEFAULT_METHOD = AUTO  # edgecompress/methods.py: every method, and what auto picks
DEFAULT_RHO = 0.9  # fraction of each replaced matrix's parameters removed
# What a replaced Linear becomes: low-rank factors, or Monarch / BLAST with as many parameters (the
# ai.edgecompress ops). Four blocks divide every Linear of the Llama-family models we build (576, 192, 1536).
STRUCTURES = tuple(structures.STRUCTURES)  # edgecompress/structures.py holds each one's facts
DEFAULT_STRUCTURE = structures.LOWRANK.name
DEFAULT_BLOCKS = 4
DEFAULT_CALIB_SEQUENCES = 128  # fitting windows; the first protocol used 16, 64-1000x fewer than published methods
DEFAULT_CALIB_SEQ_LEN = 512
DEFAULT_CALIB_HOLDOUT = 8  # held-out windows when none are asked: 8, or one per 16 fitting windows if fewer
SELF = "self"  # --calibration self[:N]: text the model generates itself
DEVICES = ("cpu", "cuda")
# The build's perplexity: windows of EVAL_SEQ_LEN tokens, DEFAULT_EVAL_WINDOWS of them for compressed
# or low-bit builds (none for plain fp32 ones: they equal PyTorch by verification).
DEFAULT_EVAL_WINDOWS = 40
EVAL_SEQ_LEN = 512
# fp16: the whole artifact in float16 (GPU targets, whose dtype is float16); int8/int4: MatMulNBits.
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
LOW_BIT_FORMATS = ("int8", "int4")


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise EdgeCompressError(f"ratio must be a fraction strictly between 0 and 1, got {ratio!r}")
    return float(ratio)


def check_rho(rho) -> float:
    if not isinstance(rho, (int, float)) or not 0.0 < float(rho) < 1.0:
        raise EdgeCompressError(f"--rho must be strictly between 0 and 1, got {rho!r}")
    return float(rho)


def check_calibration_size(n_sequences: int, seq_len: int) -> None:
    if n_sequences < 1 or seq_len < 2:
        raise EdgeCompressError(f"need at least 1 calibration sequence of 2 tokens, got {n_sequences} x {seq_len}")


def holdout_windows(n_sequences: int, holdout: int | None) -> int:
    """The held-out window count: as asked (checked), or by default DEFAULT_CALIB_HOLDOUT, at most one per 16
    fitting windows (a small calibration keeps all its windows for fitting)."""
    if holdout is None:
        return min(DEFAULT_CALIB_HOLDOUT, n_sequences // 16)
    check_holdout(n_sequences, holdout)
    return holdout


def check_holdout(n_sequences: int, holdout: int) -> None:
    if not isinstance(holdout, int) or holdout < 0:
        raise EdgeCompressError(f"--calib-holdout must be 0 or a number of windows, got {holdout!r}")
    if holdout and holdout >= n_sequences:
        raise EdgeCompressError(
            f"--calib-holdout {holdout} needs more fitting windows than that: --calib-sequences is {n_sequences}")


def parse_self_spec(spec: str) -> int | None:
    """`self` -> None (as many sequences as asked), `self:N` -> N; anything else after `self:` is refused."""
    if spec == SELF:
        return None
    count = spec[len(SELF) + 1:]
    if not count.isdigit() or int(count) < 1:
        raise EdgeCompressError(f"bad calibration spec {spec!r}: use self or self:N with N a positive number of sequences")
    return int(count)


def is_self_spec(spec: str | os.PathLike | None) -> bool:
    return isinstance(spec, str) and (spec == SELF or spec.startswith(SELF + ":"))


def check_structure(structure: str, blocks: int | None, method: str | None = None) -> int | None:
    """The block count a structure uses (DEFAULT_BLOCKS when not given; None for low-rank), refusing what
    cannot be built: an unknown structure, blocks with low-rank, fewer than 2 blocks, or a structure with a
    method whose factors are not projections of the weight (removal; gradient-scored singular groups)."""
    if not structures.get(structure).blocked:
        if blocks is not None:
            blocked = " or ".join(name for name, entry in structures.STRUCTURES.items() if entry.blocked)
            raise EdgeCompressError(f"--blocks applies to --structure {blocked}, not {structure}")
        return None
    if isinstance(blocks, bool) or (blocks is not None and (not isinstance(blocks, int) or blocks < 2)):
        raise EdgeCompressError(f"--blocks must be a whole number of at least 2, got {blocks!r}")
    chosen = check_method(resolve_method(method, None)) if method is not None else None
    if chosen is not None and (chosen.factors is None or not chosen.factors.projects_weights):
        raise EdgeCompressError(
            f"--structure {structure} needs a method that projects each weight (grasp-w, grasp-wr, grasp-wre, "
            f"grasp-topsigma, svd, svd-llm); {method} "
            + ("removes layers" if chosen.factors is None else "scores singular groups, which it does not have")
        )
    return DEFAULT_BLOCKS if blocks is None else blocks


def check_device(device: str) -> str:
    if device.split(":")[0] not in DEVICES:
        raise EdgeCompressError(f"unknown device '{device}'; use cpu or cuda[:N]")
    return device


def check_eval_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise EdgeCompressError(f"--eval-limit must be 0 (no evaluation) or a number of windows, got {limit}")


@dataclass
class CompressOptions:
    """How to compress; the plan it leads to is saved in the artifact's plan/ folder."""

    method: str = DEFAULT_METHOD
    ratio: float | None = None  # fraction of ALL parameters removed, embeddings included
    plan: Path | None = None  # reuse a saved plan: skips calibration and attribution
    calibration: str | None = None  # file, hf: spec or self[:N]; None: runtimes.text_sources' order
    calib_sequences: int = DEFAULT_CALIB_SEQUENCES
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN
    calib_holdout: int | None = None  # windows after the fitting ones, kept out of fitting; None: holdout_windows
    seed: int | None = None  # None: windows from the start; a seed: random windows (and self-generation)
    rho: float = DEFAULT_RHO
    device: str = "cpu"
    # "nearest": the layer count closest to the ratio; "at_least": never short of it (a memory budget's ratio)
    rounding: str = "nearest"
    structure: str = DEFAULT_STRUCTURE  # lowrank | monarch | blast
    blocks: int | None = None  # Monarch/BLAST blocks; None: DEFAULT_BLOCKS (structured), none (lowrank)

    def validate(self) -> None:
        """Everything that can be refused before the model is loaded (a saved plan is read by the pipeline)."""
        if self.plan is not None:
            return
        check_method(self.method)
        check_structure(self.structure, self.blocks, self.method)
        if self.ratio is None:
            raise EdgeCompressError("compression needs --ratio (fraction of all parameters to remove) or --plan")
        check_ratio(self.ratio)
        check_rho(self.rho)
        check_calibration_size(self.calib_sequences, self.calib_seq_len)
        holdout_windows(self.calib_sequences, self.calib_holdout)
        check_device(self.device)
        if is_self_spec(self.calibration):
            parse_self_spec(self.calibration)


@dataclass
class BuildOptions:
    model: str | None = None
    target: str | None = None
    out: Path | None = None
    force: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    compress: CompressOptions | None = None
    # Windows for the artifact's perplexity in the report; None: DEFAULT_EVAL_WINDOWS for compressed or
    # low-bit builds and none for plain fp32 ones; 0: never.
    eval_limit: int | None = None
    eval_data: str | None = None  # file or hf: spec; None: runtimes.text_sources' order
    weights: str | None = None  # fp32 | int8 | int4; None: the target's default
    block_size: int | None = None  # MatMulNBits block along K; None: the target's default
    fuse: bool | None = None  # onnxruntime contrib-op fusions; None: the target's default
    # Memory budget: weights + KV cache at `context` tokens + workspace must fit `max_memory_gb` (None:
    # the target's budget, at the target's max context). Without a ratio, a model that does not fit is
    # compressed with `auto_compress`'s method and calibration at the smallest ratio that fits.
    max_memory_gb: float | None = None
    context: int | None = None
    auto_compress: CompressOptions | None = None

    def validate(self) -> None:
        check_eval_limit(self.eval_limit)
        if self.max_memory_gb is not None and not (isinstance(self.max_memory_gb, (int, float)) and self.max_memory_gb > 0):
            raise EdgeCompressError(f"--max-memory must be a positive number of GB, got {self.max_memory_gb!r}")
        if self.context is not None and not (isinstance(self.context, int) and self.context > 0):
            raise EdgeCompressError(f"--context must be a positive number of tokens, got {self.context!r}")
        if self.compress is not None:
            self.compress.validate()
        elif self.auto_compress is not None:  # used only if the budget asks for compression: checked now anyway
            import dataclasses

            dataclasses.replace(self.auto_compress, ratio=0.5).validate()


@dataclass(frozen=True)
class WeightFormats:
    """The weight format of a build, resolved from the options and the target's defaults."""

    weights: str
    block_size: int
    accuracy_level: int | None
    fuse: bool

    @property
    def optimized(self) -> bool:
        """Anything after the verified fp32 export: low-bit weights or fusions."""
        return self.weights != "fp32" or self.fuse

    def as_dict(self) -> dict:
        return {"weights": self.weights, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "fuse": self.fuse}


def check_known_format(weights: str) -> None:
    if weights not in WEIGHT_FORMATS:
        raise EdgeCompressError(f"unknown weight format '{weights}'; use one of {', '.join(WEIGHT_FORMATS)}")


def check_weight_format(weights: str, block_size: int, accuracy_level: int | None = 4) -> None:
    """A format this version builds, with a block size and accuracy level MatMulNBits accepts."""
    check_known_format(weights)
    if weights in LOW_BIT_FORMATS:
        from edgecompress.passes.quantize_weights import check_format

        check_format(4 if weights == "int4" else 8, block_size, accuracy_level)


def resolve_formats(options: BuildOptions, profile: TargetProfile) -> WeightFormats:
    """Weight format, block size and fusion from the options or the target's defaults; refused early."""
    weights = options.weights or profile.weights
    check_known_format(weights)  # before the target's list, so a typo is not reported as unsupported
    if weights not in profile.weight_formats:
        raise EdgeCompressError(
            f"target '{profile.name}' cannot run {weights} weights; it supports {', '.join(profile.weight_formats)}"
        )
    block_size = int(options.block_size or profile.block_size)
    check_weight_format(weights, block_size, profile.accuracy_level)
    fuse = options.fuse
    if fuse is None:
        fuse = weights != "fp32" if profile.fuse == "low-bit" else profile.fuse
    return WeightFormats(weights, block_size, profile.accuracy_level, bool(fuse))
