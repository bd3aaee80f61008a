"""Reading an artifact folder: its JSON files, its tokenizer, and a check against report.json's manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgecompress.contract import REPORT_FILE, TOKENIZER_FILE
from edgecompress.errors import first_line
from edgecompress.runtimes.errors import ArtifactRuntimeError


def artifact_folder(artifact) -> Path:
    folder = Path(artifact)
    if folder.is_file() and folder.suffix == ".onnx":
        folder = folder.parent
    if not folder.is_dir():
        raise ArtifactRuntimeError(f"'{artifact}' is not an artifact folder")
    return folder


def read_json(folder: Path, name: str, required: bool = True) -> dict:
    path = folder / name
    if not path.is_file():
        if required:
            raise ArtifactRuntimeError(f"'{folder}' has no {name}")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ArtifactRuntimeError(f"'{path}' is not valid JSON: {exc}") from None


def load_tokenizer(folder: Path):
    """The artifact's `tokenizers.Tokenizer` (imported here: manifest checks need no tokenizer)."""
    from tokenizers import Tokenizer

    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise ArtifactRuntimeError(f"'{folder}' has no {TOKENIZER_FILE}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ArtifactRuntimeError(f"'{path}' is not a readable tokenizer: {first_line(exc)}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(folder: Path, hashes: bool = True) -> dict:
    """Every file listed in report.json's manifest is present with its size (and sha256 when `hashes`)."""
    manifest = read_json(folder, REPORT_FILE).get("manifest")
    if not manifest:
        raise ArtifactRuntimeError(f"'{folder / REPORT_FILE}' has no manifest to check the files against")
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactRuntimeError(f"artifact file '{name}' is missing from '{folder}'")
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactRuntimeError(
                f"artifact file '{name}' has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            )
        if hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactRuntimeError(f"artifact file '{name}' does not match its sha256 in the manifest (corrupted?)")
    return manifest


def artifact_providers(folder: Path, providers: list[str] | None = None) -> tuple[list, list[str]]:
    """The onnxruntime providers (with their options) to run an artifact with, and warnings.

    Asked-for `providers` win. Otherwise the providers of the target the artifact was built for
    (report.json's copy of the profile), those this onnxruntime has, in order, with the target's
    provider options; when its first choice is not here, the next one present (else CPU) and a
    one-line warning."""
    from edgecompress.targets import profiles
    from edgecompress.errors import EdgeCompressError

    if providers:
        return list(providers), []
    described = read_json(folder, REPORT_FILE, required=False).get("target")
    if not described:  # an artifact from before targets were recorded: the CPU
        return [("CPUExecutionProvider", {})], []
    try:
        target = profiles.from_description(described, f"'{folder / REPORT_FILE}' target")
    except EdgeCompressError as exc:
        raise ArtifactRuntimeError(first_line(exc)) from None
    present = target.session_providers()
    if present[0][0] == target.execution_provider[0]:
        return present, []
    from edgecompress.runtimes.onnxruntime_install import artifact_requirements, describe, install_hint

    missing = [name for name in target.execution_provider if name not in target.providers]
    hint = install_hint(artifact_requirements(folder) or profiles.runtime_requirements(target))
    return present, [f"the artifact's target {target.name} runs on {', '.join(missing)}, which this onnxruntime "
                     f"({describe()}) lacks; running on {present[0][0]}. To run it there: {hint}"]
