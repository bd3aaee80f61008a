"""Which onnxruntime this machine has, and whether it can run an artifact (report.json's `requirements`).

The runtime names no onnxruntime distribution as a dependency: a device brings its own (onnxruntime,
onnxruntime-gpu, a Jetson wheel), and a second one providing the same module is a known source of broken
installs. So the check happens here, before anything imports onnxruntime: none at all, or one older than the
artifact needs, is one line naming what to install.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from edgecompress.contract import REPORT_FILE
from edgecompress.runtimes.artifact_files import read_json
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.targets.profiles import version_tuple

JETSON_HINT = "on a Jetson, the Jetson AI Lab wheel for your JetPack (README: On the device)"


def distributions() -> list[tuple[str, str]]:
    """(distribution, version) of every installed distribution that provides the `onnxruntime` module."""
    found = []
    for name in sorted(set(metadata.packages_distributions().get("onnxruntime", []))):
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return found


def describe() -> str:
    """One line for profile's header: the distribution found (and a warning when there are several)."""
    found = distributions()
    if not found:
        return "none installed"
    text = ", ".join(f"{name} {version}" for name, version in found)
    return text if len(found) == 1 else f"{text} (several distributions provide the onnxruntime module: keep one)"


def both_edgecompress_distributions() -> str | None:
    """A warning when the compiler (`edgecompress`) and the runtime-only `edgecompress-runtime` are both
    installed: they provide the same files, and removing one breaks the other."""
    installed = []
    for name in ("edgecompress", "edgecompress-runtime"):
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if len(installed) < 2:
        return None
    return (f"{' and '.join(installed)} are both installed; they are one package in two distributions: "
            "pip uninstall edgecompress-runtime (the compiler holds the runtime)")


def install_hint(requirements: dict, upgrade: bool = False) -> str:
    distribution = requirements.get("onnxruntime") or "onnxruntime"
    hint = f"pip install {'-U ' if upgrade else ''}{distribution}"
    return hint + (f"; {JETSON_HINT}" if distribution == "onnxruntime-gpu" else "")


def artifact_requirements(folder: Path) -> dict:
    return read_json(folder, REPORT_FILE, required=False).get("requirements") or {}


def check(folder: Path) -> None:
    """Refuse, in one line, a machine whose onnxruntime cannot run the artifact in `folder` at all."""
    requirements = artifact_requirements(folder)
    try:
        import onnxruntime
    except ImportError:
        provider = requirements.get("execution_provider", "CPUExecutionProvider")
        raise ArtifactRuntimeError(f"no onnxruntime is installed: this artifact runs on {provider}; "
                                   f"{install_hint(requirements)}") from None
    minimum = requirements.get("min_version")
    if minimum and version_tuple(onnxruntime.__version__) < version_tuple(minimum):
        raise ArtifactRuntimeError(f"onnxruntime {onnxruntime.__version__} is older than this artifact needs "
                                   f"(>= {minimum}): {install_hint(requirements, upgrade=True)}")
