"""Target profiles: one TOML file per device in edgecompress.targets, or a user's own file, read into a
typed `TargetProfile`.

The pipeline reads the profile once and hands it to the stages that need it. Every key of a file must
be a field below: a misspelt or unknown key is refused with its name and the file, never ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecompress.errors import EdgeCompressError
from edgecompress.options import DEVICES

DEFAULT_TARGET = "cpu-x86"
DTYPES = ("float32", "float16", "bfloat16")
BUILT_DTYPES = ("float32",)  # what this version's export produces


@dataclass(frozen=True)
class LowBitBounds:
    """How far int8/int4 weights may move the fp32 export's next-token distributions."""

    max_mean_kl: float  # mean KL divergence over the verification text
    min_top1_agreement: float  # fraction of positions with the same argmax


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


@dataclass(frozen=True)
class TargetProfile:
    """One device. Required: name, description, device, execution_provider, dtype."""

    name: str  # what --target takes; the default output folder ends with it
    description: str  # one line for `edgecompress targets`
    device: str  # "cpu" or "cuda": what the artifact runs on
    execution_provider: tuple[str, ...]  # onnxruntime providers in order of preference (a string or a list)
    dtype: str  # compute dtype of the artifact: float32 (GPU targets: float16/bfloat16, not built yet)
    memory_gb: float | None = None  # device memory, for `targets` and roofline estimates
    memory_bandwidth_gbs: float | None = None
    peak_tflops_fp32: float | None = None
    threads: int | None = None  # onnxruntime intra-op threads for verification and evaluation
    weight_formats: tuple[str, ...] = ("fp32",)  # what `--weights` may ask for on this target
    weights: str = "fp32"  # the default `--weights`
    block_size: int = 32  # the default `--block-size` (MatMulNBits block along K)
    accuracy_level: int | None = 4  # MatMulNBits accuracy level (4: int8 activations, the fast CPU kernel)
    fuse: bool | str = "low-bit"  # the default `--fuse`: true, false, or "low-bit" (int8/int4 builds only)
    verify: VerifyBounds = field(default_factory=VerifyBounds)
    origin: str = ""  # bundled:<name> or the file's path (set when loaded)

    @property
    def providers(self) -> list[str]:
        """The profile's providers that this onnxruntime has, in order; the CPU provider when none are."""
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        present = [provider for provider in self.execution_provider if provider in available]
        return present or ["CPUExecutionProvider"]

    def low_bit_bounds(self, weights: str) -> LowBitBounds:
        return self.verify.low_bit[weights]

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for the report and `targets --json` (verification bounds left out)."""
        data = dataclasses.asdict(self)
        data.pop("verify")
        data["execution_provider"] = list(self.execution_provider)
        data["weight_formats"] = list(self.weight_formats)
        return data


REQUIRED_KEYS = tuple(f.name for f in dataclasses.fields(TargetProfile) if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING)
_NUMBERS = ("memory_gb", "memory_bandwidth_gbs", "peak_tflops_fp32")


def _bundled() -> dict[str, Any]:
    files = resources.files("edgecompress.targets")
    return {entry.name[: -len(".toml")]: entry for entry in files.iterdir() if entry.name.endswith(".toml")}


def available() -> list[str]:
    return sorted(_bundled())


def load_profile(name_or_path: str | None) -> TargetProfile:
    """A bundled profile by name, or a TOML file path; unknown names list the valid ones."""
    name_or_path = name_or_path or DEFAULT_TARGET
    bundled = _bundled()
    if name_or_path in bundled:
        text, origin = bundled[name_or_path].read_text(), f"bundled:{name_or_path}"
    elif name_or_path.endswith(".toml") and Path(name_or_path).is_file():
        text, origin = Path(name_or_path).read_text(), str(Path(name_or_path).resolve())
    else:
        raise EdgeCompressError(f"unknown target '{name_or_path}'; valid targets: {', '.join(available())}")
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
    for key in ("name", "description", "device", "dtype", "weights"):
        if key in values:
            _expect(isinstance(values[key], str), key, "a string", origin)
    _expect(values["device"] in DEVICES, "device", f"one of {', '.join(DEVICES)}", origin)
    _expect(values["dtype"] in DTYPES, "dtype", f"one of {', '.join(DTYPES)}", origin)
    for key in ("execution_provider", "weight_formats"):
        if key in values:
            values[key] = _string_tuple(values[key], key, origin)
    for key in _NUMBERS:
        if key in values:
            _expect(_is_number(values[key]) and values[key] > 0, key, "a positive number", origin)
    for key in ("threads", "block_size"):
        if key in values:
            _expect(_is_int(values[key]) and values[key] > 0, key, "a positive integer", origin)
    if "accuracy_level" in values:
        level = values["accuracy_level"]
        _expect(_is_int(level) and 0 <= level <= 4, "accuracy_level", "an integer 0..4", origin)
    if "fuse" in values:
        fuse = values["fuse"]
        _expect(isinstance(fuse, bool) or fuse == "low-bit", "fuse", 'true, false or "low-bit"', origin)
    values["verify"] = _verify_bounds(values.get("verify", {}), origin)
    return TargetProfile(**values, origin=origin)


def _verify_bounds(table: Any, origin: str) -> VerifyBounds:
    _expect(isinstance(table, dict), "verify", "a table", origin)
    defaults = VerifyBounds()
    formats = set(defaults.low_bit)
    _refuse_unknown(table, {"logits_atol", "logits_rtol", "greedy_tokens", *formats}, "verify.", origin)
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
    return VerifyBounds(**scalars, low_bit=low_bit)


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


def _string_tuple(value: Any, key: str, origin: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    _expect(isinstance(items, list) and bool(items) and all(isinstance(item, str) for item in items), key,
            "a string or a non-empty list of strings", origin)
    return tuple(items)


def all_profiles() -> list[TargetProfile]:
    return [load_profile(name) for name in available()]
