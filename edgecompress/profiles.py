"""Target profiles: TOML files shipped in edgecompress.targets, or a user's own TOML file.

The pipeline reads the profile once and hands the dict to the stages that need it.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from edgecompress.errors import EdgeCompressError

DEFAULT_TARGET = "cpu-x86"
REQUIRED_KEYS = ("name", "description", "device", "execution_provider", "dtype")


def _bundled() -> dict[str, Any]:
    files = resources.files("edgecompress.targets")
    return {entry.name[: -len(".toml")]: entry for entry in files.iterdir() if entry.name.endswith(".toml")}


def available() -> list[str]:
    return sorted(_bundled())


def load_profile(name_or_path: str | None) -> dict[str, Any]:
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
        profile = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgeCompressError(f"target profile {origin} is not valid TOML: {exc}") from None
    missing = [key for key in REQUIRED_KEYS if key not in profile]
    if missing:
        raise EdgeCompressError(f"target profile {origin} lacks {', '.join(missing)}")
    profile["origin"] = origin
    return profile


def all_profiles() -> list[dict[str, Any]]:
    return [load_profile(name) for name in available()]
