"""Where calibration and evaluation text comes from, resolved in one documented order.

1. What the user names: a text file, or `hf:DATASET[:CONFIG]:SPLIT[:FIELD]` (a Hugging Face dataset,
   a Hub name or a local dataset folder; rows joined with blank lines). The build also takes
   `self[:N]` for calibration: text the model generates itself (`edgecompress.calibrate`).
2. `$EDGECOMPRESS_DATA`: a folder holding WikiText-2's files, `wiki.valid.tokens` (calibration) and
   `wiki.test.raw` (evaluation). Set but missing the file is an error, never a silent fallback.
3. The `datasets` library: `wikitext` / `wikitext-2-raw-v1`, validation split to calibrate, test split
   to evaluate; online, or offline from the local cache (set HF_HUB_OFFLINE=1 on a machine without
   network to skip the attempt). Its rows are the file's lines, newline included, so they are joined
   as they are.
4. Nothing: a `NoText` with the reason. Calibration then falls back to self-generated text; evaluation is skipped
   (build) or refused (`edgecompress eval`).

Torch-free: `edgecompress eval` and the build share this module. The WikiText-2 test split is
refused as calibration text wherever it comes from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from edgecompress.errors import first_line
from edgecompress.runtimes.errors import ArtifactRuntimeError

DATA_ENV = "EDGECOMPRESS_DATA"
CALIBRATION, EVALUATION = "calibration", "evaluation"
# Per role: the file in $EDGECOMPRESS_DATA, and the `datasets` split.
WIKITEXT_FILES = {CALIBRATION: "wiki.valid.tokens", EVALUATION: "wiki.test.raw"}
WIKITEXT_DATASET = ("wikitext", "wikitext-2-raw-v1")
WIKITEXT_SPLITS = {CALIBRATION: "validation", EVALUATION: "test"}
# The evaluation split, by file name and by content: calibrating on it would leak the test set.
WIKITEXT_TEST_FILES = ("wiki.test.raw", "wiki.test.tokens")
WIKITEXT_TEST_SHA256 = (
    "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",  # wiki.test.raw, as read here
    "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",  # recorded earlier (another form)
)


@dataclass(frozen=True)
class TextSource:
    text: str
    description: str  # the path or spec that was read
    origin: str  # "user" | DATA_ENV | "datasets"

    @cached_property
    def sha256(self) -> str:
        return sha256_text(self.text)


@dataclass(frozen=True)
class NoText:
    """Nothing found for a role without a user spec, and why (for the warning or the error)."""

    reason: str


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve(spec: str | os.PathLike | None, role: str) -> TextSource | NoText:
    """The text for `role` (CALIBRATION or EVALUATION): the user's spec, else steps 2-4 above."""
    if spec is not None:
        return read_spec(os.fspath(spec), role)
    folder = os.environ.get(DATA_ENV)
    if folder:
        path = Path(folder) / WIKITEXT_FILES[role]
        if not path.is_file():
            raise ArtifactRuntimeError(f"{DATA_ENV}={folder} has no {WIKITEXT_FILES[role]} (the {role} text)")
        return TextSource(read_text_file(path), str(path), DATA_ENV)
    name, config = WIKITEXT_DATASET
    try:
        rows = load_hf_rows(name, config, WIKITEXT_SPLITS[role], "text")
    except ArtifactRuntimeError as exc:  # no network and no cached copy, or no `datasets`: step 4
        return NoText(f"no {role} text given, {DATA_ENV} is unset and {exc}")
    return TextSource("".join(rows), f"hf:{name}:{config}:{WIKITEXT_SPLITS[role]}", "datasets")


def read_spec(spec: str, role: str) -> TextSource:
    """A user's file or `hf:` spec; calibration refuses the WikiText-2 test split."""
    if spec.startswith("hf:"):
        fields = parse_hf_spec(spec)
        if role == CALIBRATION and "wikitext" in fields["name"].lower() and fields["split"].split("[")[0] == "test":
            raise ArtifactRuntimeError(
                f"{spec} is the WikiText evaluation (test) split; calibrate on the validation or train split"
            )
        rows = load_hf_rows(fields["name"], fields["config"], fields["split"], fields["column"], spec)
        return TextSource("\n\n".join(rows), spec, "user")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ArtifactRuntimeError(f"{role} text '{spec}' does not exist")
    text = read_text_file(path)
    if role == CALIBRATION and (path.name in WIKITEXT_TEST_FILES or sha256_text(text) in WIKITEXT_TEST_SHA256):
        raise ArtifactRuntimeError(
            f"{spec} is the WikiText-2 evaluation (test) split; calibrate on "
            f"{WIKITEXT_FILES[CALIBRATION]} or another text instead"
        )
    return TextSource(text, str(path), "user")


def read_text_file(path: Path) -> str:
    """UTF-8 with universal newlines (a CRLF file reads as "\\n", as Python's text mode does)."""
    try:
        return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError:
        raise ArtifactRuntimeError(f"text file '{path}' is not UTF-8") from None


def _split_spec(spec: str) -> list[str]:
    """Split on ':' but not inside [...] so split slices like `train[:100]` survive."""
    parts, current, depth = [], "", 0
    for char in spec:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_hf_spec(spec: str) -> dict:
    """`hf:NAME[:CONFIG]:SPLIT[:COLUMN]` -> {name, config, split, column}."""
    parts = _split_spec(spec[len("hf:"):])
    if len(parts) == 2:
        (name, split), config, column = parts, None, "text"
    elif len(parts) == 3:
        (name, config, split), column = parts, "text"
    elif len(parts) == 4:
        name, config, split, column = parts
    else:
        raise ArtifactRuntimeError(f"bad dataset spec {spec!r}: expected hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    if not name or not split:
        raise ArtifactRuntimeError(f"bad dataset spec {spec!r}: NAME and SPLIT are required")
    return {"name": name, "config": config or None, "split": split, "column": column or "text"}


def load_hf_rows(name: str, config: str | None, split: str, column: str, spec: str | None = None) -> list[str]:
    """One column of a dataset split as strings, through `datasets.load_dataset`."""
    spec = spec or f"hf:{name}:{config or ''}:{split}:{column}"
    try:
        import datasets
    except ImportError:  # optional dependency
        raise ArtifactRuntimeError(f"{spec} needs the Hugging Face datasets library: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, offline without a cache, missing folder, unknown split
        raise ArtifactRuntimeError(f"cannot load dataset {spec}: {first_line(exc)}") from None
    if column not in dataset.column_names:
        raise ArtifactRuntimeError(f"dataset {spec} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    return [str(row) for row in dataset[column]]
