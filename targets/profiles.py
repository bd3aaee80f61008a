"""Target profiles: one TOML file per device in edgecompress.targets, or a user's own file, read into a
typed `TargetProfile`.

The pipeline reads the profile once and hands it to the stages that need it. Every key of a file must
be a field below: a misspelt or unknown key is refused with its name and the file, never ignored.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecompress import contract
from edgecompress.errors import EdgeCompressError

DEFAULT_TARGET = "cpu-x86"
DEVICES = ("cpu", "cuda")  # where an artifact runs (and where attribution may run: options.check_device)
# The onnxruntime distribution that serves each device's providers (a Jetson's onnxruntime-gpu comes from the
# Jetson AI Lab wheel index), and the oldest onnxruntime an artifact runs on (its contrib ops; pyproject's bound).
ONNXRUNTIME_DISTRIBUTIONS = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu"}
MIN_ONNXRUNTIME = "1.20"
DTYPES = ("float32", "float16", "bfloat16")
BUILT_DTYPES = ("float32", "float16")  # what this version builds (bfloat16: only as the fp16 escalation)


@dataclass(frozen=True)
class LowBitBounds:
    """How far int8/int4 weights may move the fp32 export's next-token distributions."""

    max_mean_kl: float  # mean KL divergence over the verification text
    min_top1_agreement: float  # fraction of positions with the same argmax


@dataclass(frozen=True)
class Fp16Bounds:
    """How far an fp16 artifact may move the fp32 export's logits (`[verify.float16]`)."""

    max_mean_kl: float = 0.002  # mean KL of next-token distributions over the verification text
    min_top1_agreement: float = 0.98
    max_abs_logit_delta: float = 1.0  # max|Δlogit| over every position and vocabulary entry


@dataclass(frozen=True)
class Fp16Policy:
    """The `[fp16]` table: how the fp32 export becomes an fp16 artifact."""

    keep_io: tuple[str, ...] = ("logits",)  # graph inputs/outputs that stay fp32
    absmax_block: float = 16384.0  # activations whose fp32 absmax reaches this stay fp32 (2^14: 4x headroom)
    op_block_list: tuple[str, ...] = ()  # ops kept fp32 on top of the converter's defaults


@dataclass(frozen=True)
class VerifyBounds:
    """The `[verify]` table: parity bounds for every build on this target."""

    logits_atol: float = 1e-3  # max|Δlogit| <= logits_atol + logits_rtol * max|reference logit|
    logits_rtol: float = 1e-4
    greedy_tokens: int = 16  # greedy tokens that must be identical
    # `[verify.int8]`, `[verify.int4]`: defaults measured on smollm2-135m (README, "Weight formats").
    low_bit: dict[str, LowBitBounds] = field(default_factory=lambda: {
        "int8": LowBitBounds(0.02, 0.9), "int4": LowBitBounds(0.2, 0.7),
    })
    float16: Fp16Bounds = field(default_factory=Fp16Bounds)  # `[verify.float16]`


@dataclass(frozen=True)
class TargetProfile:
    """One device. Required: name, description, device, execution_provider, dtype."""

    name: str  # what --target takes; the default output folder ends with it
    description: str  # one line for `edgecompress targets`
    device: str  # "cpu" or "cuda": what the artifact runs on
    execution_provider: tuple[str, ...]  # onnxruntime providers in order of preference (a string or a list)
    dtype: str  # compute dtype of the artifact: float32 (CPU) or float16 (CUDA targets)
    aliases: tuple[str, ...] = ()  # other names --target accepts for this profile (a family name)
    sources: tuple[str, ...] = ()  # where the numbers come from (each number's own comment says which)
    arch: str | None = None  # GPU architecture ("sm_87") or CPU ISA ("x86-64-v3")
    # Memory. The budget is what one model may use: weights + KV cache at max_context + workspace.
    memory_gb: float | None = None  # device memory (Jetson: the unified memory the CPU shares)
    memory_budget_gb: float | None = None  # None: memory_gb (a CPU host's RAM)
    workspace_gb: float = 0.5  # runtime context, arena slack and activations on top of weights + KV
    shared_memory: bool = False  # true on Jetson: GPU allocations come out of the same RAM as the CPU's
    max_context: int | None = None  # the context the budget is checked at (None: the model's own)
    # Roofline numbers (dense, no sparsity): bytes and FLOPs per token against these give the estimate.
    memory_bandwidth_gbs: float | None = None
    emc_bus_bits: int | None = None  # Jetson: DRAM bus width, to recompute bandwidth from the live EMC clock
    peak_tflops_fp32: float | None = None
    peak_tflops_fp16: float | None = None  # tensor cores, dense, fp32 accumulation
    peak_tops_int8: float | None = None  # dense
    bw_efficiency: float = 0.7  # fraction of peak bandwidth a good decode kernel reaches (an estimate)
    compute_efficiency: float = 0.6  # fraction of peak FLOPs a good prefill GEMM reaches (an estimate)
    bf16_supported: bool = False
    # onnxruntime: `[provider_options.<Provider>]` tables of string options, passed as they are.
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    threads: int | None = None  # onnxruntime intra-op threads for verification and evaluation
    custom_ops: tuple[str, ...] = ()  # our ai.edgecompress ops this target runs (the others are lowered)
    expected_power_mode: str | None = None  # Jetson nvpmodel mode the numbers assume; the profiler warns
    min_jetpack: str | None = None  # the JetPack the provider options and kernels assume
    weight_formats: tuple[str, ...] = ("fp32",)  # what `--weights` may ask for on this target
    weights: str = "fp32"  # the default `--weights`
    block_size: int = 32  # the default `--block-size` (MatMulNBits block along K)
    accuracy_level: int | None = 4  # MatMulNBits accuracy level (4: int8 activations, the fast CPU kernel)
    fuse: bool | str = "low-bit"  # the default `--fuse`: true, false, or "low-bit" (int8/int4 builds only)
    fp16: Fp16Policy = field(default_factory=Fp16Policy)
    verify: VerifyBounds = field(default_factory=VerifyBounds)
    origin: str = ""  # bundled:<name> or the file's path (set when loaded)

    @property
    def providers(self) -> list[str]:
        """The profile's providers that this onnxruntime has, in order; the CPU provider when none are."""
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        present = [provider for provider in self.execution_provider if provider in available]
        return present or ["CPUExecutionProvider"]

    def session_providers(self) -> list[tuple[str, dict[str, str]]]:
        """`providers` with their `[provider_options]`, as onnxruntime's `providers=` takes them."""
        return [(provider, dict(self.provider_options.get(provider, {}))) for provider in self.providers]

    @property
    def budget_gb(self) -> float | None:
        return self.memory_budget_gb if self.memory_budget_gb is not None else self.memory_gb

    @property
    def peak_tflops(self) -> float | None:
        """The dense peak in the artifact's compute dtype."""
        return self.peak_tflops_fp32 if self.dtype == "float32" else self.peak_tflops_fp16

    def low_bit_bounds(self, weights: str) -> LowBitBounds:
        return self.verify.low_bit[weights]

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for the report and `targets --json` (verification bounds left out)."""
        data = dataclasses.asdict(self)
        data.pop("verify")
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["fp16"] = {key: list(v) if isinstance(v, tuple) else v for key, v in data["fp16"].items()}
        data["budget_gb"], data["peak_tflops"] = self.budget_gb, self.peak_tflops  # DERIVED_KEYS, for `targets`
        return data


DERIVED_KEYS = ("budget_gb", "peak_tflops", "origin")  # in describe(), not fields a profile file may set


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def runtime_requirements(profile: "TargetProfile", custom_ops: dict | None = None) -> dict[str, Any]:
    """What a device needs to run an artifact built for `profile` (report.json's `requirements`): the onnxruntime
    distribution and oldest version, the execution provider, and our op library when the graph uses it
    (`custom_ops`: its manifest; it needs onnxruntime's C API version and ships cubins for some sms)."""
    minimum, library = MIN_ONNXRUNTIME, None
    if custom_ops:
        info = custom_ops["library"]
        minimum = max(minimum, f"1.{info['ort_api_version']}", key=version_tuple)
        library = {"file": contract.CUSTOM_OPS_LIBRARY_FILE, "ops": info.get("ops", []),
                   "ort_api_version": info["ort_api_version"], "cuda_sms": (info.get("cubins") or {}).get("sms", [])}
    return {"onnxruntime": ONNXRUNTIME_DISTRIBUTIONS[profile.device], "min_version": minimum,
            "execution_provider": profile.execution_provider[0], "custom_op_library": library}


def from_description(described: dict[str, Any], origin: str) -> TargetProfile:
    """The inverse of `describe()`: the copy of a profile in an artifact's report.json, checked like a file
    (its verification bounds were left out, so they are the defaults; a null is a field TOML left unset)."""
    return parse_profile({key: value for key, value in described.items()
                          if key not in DERIVED_KEYS and value is not None}, origin)


REQUIRED_KEYS = tuple(f.name for f in dataclasses.fields(TargetProfile) if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING)
_NUMBERS = ("memory_gb", "memory_budget_gb", "memory_bandwidth_gbs", "peak_tflops_fp32", "peak_tflops_fp16",
            "peak_tops_int8", "workspace_gb")
_FRACTIONS = ("bw_efficiency", "compute_efficiency")
_STRINGS = ("name", "description", "device", "dtype", "weights", "arch", "expected_power_mode", "min_jetpack")
_LISTS = ("execution_provider", "weight_formats", "aliases", "custom_ops", "sources")


def _bundled() -> dict[str, Any]:
    files = resources.files("edgecompress.targets")
    return {entry.name[: -len(".toml")]: entry for entry in files.iterdir() if entry.name.endswith(".toml")}


def available() -> list[str]:
    return sorted(_bundled())


def aliases() -> dict[str, str]:
    """Alias -> bundled profile name (`jetson-orin` -> `jetson-orin-nano`)."""
    table = {}
    for name, entry in _bundled().items():
        for alias in tomllib.loads(entry.read_text()).get("aliases", []):
            table[alias] = name
    return table


def load_profile(name_or_path: str | None) -> TargetProfile:
    """A bundled profile by name, or a TOML file path; unknown names list the valid ones."""
    name_or_path = name_or_path or DEFAULT_TARGET
    bundled = _bundled()
    name_or_path = aliases().get(name_or_path, name_or_path)
    if name_or_path in bundled:
        text, origin = bundled[name_or_path].read_text(), f"bundled:{name_or_path}"
    elif name_or_path.endswith(".toml") and Path(name_or_path).is_file():
        text, origin = Path(name_or_path).read_text(), str(Path(name_or_path).resolve())
    else:
        valid = ", ".join(available() + sorted(aliases()))
        raise EdgeCompressError(f"unknown target '{name_or_path}'; valid targets: {valid} (or a .toml file)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgeCompressError(f"target profile {origin} is not valid TOML: {exc}") from None
    return parse_profile(data, origin)


def parse_profile(data: dict[str, Any], origin: str) -> TargetProfile:
    """Check every key and type of a profile table; the error names the key and the file."""
    known = {f.name for f in dataclasses.fields(TargetProfile)} - {"origin"}
    _refuse_unknown(data, known, "", origin)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise EdgeCompressError(f"target profile {origin} lacks {', '.join(missing)}")
    values = dict(data)
    for key in _STRINGS:
        if key in values:
            _expect(isinstance(values[key], str), key, "a string", origin)
    _expect(values["device"] in DEVICES, "device", f"one of {', '.join(DEVICES)}", origin)
    _expect(values["dtype"] in DTYPES, "dtype", f"one of {', '.join(DTYPES)}", origin)
    for key in _LISTS:
        if key in values:
            values[key] = _string_tuple(values[key], key, origin, allow_empty=key in ("aliases", "custom_ops", "sources"))
    if "custom_ops" in values:
        from edgecompress.kernels.reference import OPS

        unknown = [op for op in values["custom_ops"] if op not in OPS]
        _expect(not unknown, "custom_ops", f"a list of {', '.join(OPS)} (not {', '.join(unknown)})", origin)
    for key in _NUMBERS:
        if key in values:
            _expect(_is_number(values[key]) and values[key] > 0, key, "a positive number", origin)
    for key in _FRACTIONS:
        if key in values:
            _expect(_is_number(values[key]) and 0 < values[key] <= 1, key, "a fraction in (0, 1]", origin)
    for key in ("shared_memory", "bf16_supported"):
        if key in values:
            _expect(isinstance(values[key], bool), key, "true or false", origin)
    for key in ("threads", "block_size", "max_context", "emc_bus_bits"):
        if key in values:
            _expect(_is_int(values[key]) and values[key] > 0, key, "a positive integer", origin)
    if "accuracy_level" in values:
        level = values["accuracy_level"]
        _expect(_is_int(level) and 0 <= level <= 4, "accuracy_level", "an integer 0..4", origin)
    if "fuse" in values:
        fuse = values["fuse"]
        _expect(isinstance(fuse, bool) or fuse == "low-bit", "fuse", 'true, false or "low-bit"', origin)
    if "provider_options" in values:
        values["provider_options"] = _provider_options(values["provider_options"], origin)
    values["fp16"] = _fp16_policy(values.get("fp16", {}), origin)
    values["verify"] = _verify_bounds(values.get("verify", {}), origin)
    return TargetProfile(**values, origin=origin)


def _provider_options(table: Any, origin: str) -> dict[str, dict[str, str]]:
    _expect(isinstance(table, dict), "provider_options", "a table of [provider_options.<Provider>] tables", origin)
    result = {}
    for provider, options in table.items():
        key = f"provider_options.{provider}"
        _expect(isinstance(options, dict), key, "a table", origin)
        for name, value in options.items():
            _expect(isinstance(value, str), f"{key}.{name}", "a string (onnxruntime takes string options)", origin)
        result[provider] = dict(options)
    return result


def _fp16_policy(table: Any, origin: str) -> Fp16Policy:
    _expect(isinstance(table, dict), "fp16", "a table", origin)
    _refuse_unknown(table, {"keep_io", "absmax_block", "op_block_list"}, "fp16.", origin)
    values = {}
    for key in ("keep_io", "op_block_list"):
        if key in table:
            values[key] = _string_tuple(table[key], f"fp16.{key}", origin, allow_empty=True)
    for name in values.get("keep_io", ()):  # the float graph I/O of the artifact contract
        _expect(name == contract.LOGITS or contract.is_kv_name(name), "fp16.keep_io",
                f"a list of float graph I/O names (logits, past_key_values.N.key, present.N.value, ...), not '{name}'",
                origin)
    if "absmax_block" in table:
        block = table["absmax_block"]
        _expect(_is_number(block) and 0 < block <= 65504, "fp16.absmax_block", "a number in (0, 65504]", origin)
        values["absmax_block"] = float(block)
    return Fp16Policy(**values)


def _verify_bounds(table: Any, origin: str) -> VerifyBounds:
    _expect(isinstance(table, dict), "verify", "a table", origin)
    defaults = VerifyBounds()
    formats = set(defaults.low_bit)
    _refuse_unknown(table, {"logits_atol", "logits_rtol", "greedy_tokens", "float16", *formats}, "verify.", origin)
    for key in ("logits_atol", "logits_rtol"):
        if key in table:
            _expect(_is_number(table[key]) and table[key] >= 0, f"verify.{key}", "a number >= 0", origin)
    if "greedy_tokens" in table:
        _expect(_is_int(table["greedy_tokens"]) and table["greedy_tokens"] > 0, "verify.greedy_tokens",
                "a positive integer", origin)
    low_bit = dict(defaults.low_bit)
    for weights in formats & set(table):
        section, default = table[weights], defaults.low_bit[weights]
        _expect(isinstance(section, dict), f"verify.{weights}", "a table", origin)
        _refuse_unknown(section, {"max_mean_kl", "min_top1_agreement"}, f"verify.{weights}.", origin)
        for key in section:
            _expect(_is_number(section[key]) and section[key] >= 0, f"verify.{weights}.{key}", "a number >= 0", origin)
        low_bit[weights] = LowBitBounds(float(section.get("max_mean_kl", default.max_mean_kl)),
                                        float(section.get("min_top1_agreement", default.min_top1_agreement)))
    scalars = {key: table[key] for key in ("logits_atol", "logits_rtol", "greedy_tokens") if key in table}
    return VerifyBounds(**scalars, low_bit=low_bit, float16=_fp16_bounds(table.get("float16", {}), origin))


def _fp16_bounds(section: Any, origin: str) -> Fp16Bounds:
    _expect(isinstance(section, dict), "verify.float16", "a table", origin)
    names = {f.name for f in dataclasses.fields(Fp16Bounds)}
    _refuse_unknown(section, names, "verify.float16.", origin)
    for key in section:
        _expect(_is_number(section[key]) and section[key] >= 0, f"verify.float16.{key}", "a number >= 0", origin)
    return Fp16Bounds(**{key: float(value) for key, value in section.items()})


def _refuse_unknown(table: dict, known: set[str], prefix: str, origin: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise EdgeCompressError(
            f"target profile {origin}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})"
        )


def _expect(condition: bool, key: str, what: str, origin: str) -> None:
    if not condition:
        raise EdgeCompressError(f"target profile {origin}: '{key}' must be {what}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_tuple(value: Any, key: str, origin: str, allow_empty: bool = False) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    ok = isinstance(items, list) and (bool(items) or allow_empty) and all(isinstance(item, str) for item in items)
    _expect(ok, key, "a list of strings" if allow_empty else "a string or a non-empty list of strings", origin)
    return tuple(items)


def all_profiles() -> list[TargetProfile]:
    return [load_profile(name) for name in available()]
