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
    (report.json), those this onnxruntime has, in order, with the target's provider options; when
    none of them is here, the CPU provider and a one-line warning."""
    import onnxruntime as ort

    if providers:
        return list(providers), []
    target = read_json(folder, REPORT_FILE, required=False).get("target") or {}
    wanted = target.get("execution_provider") or ["CPUExecutionProvider"]
    options = target.get("provider_options") or {}
    available = set(ort.get_available_providers())
    present = [(name, dict(options.get(name, {}))) for name in wanted if name in available]
    if present and present[0][0] == wanted[0]:
        return present, []
    fallback = present or [("CPUExecutionProvider", {})]
    missing = [name for name in wanted if name not in available]
    return fallback, [f"the artifact's target {target.get('name', '?')} runs on {', '.join(missing)}, which this "
                      f"onnxruntime lacks; running on {fallback[0][0]}"]
