"""Calibration data: token windows cut from a text source, with enough metadata to hash and replay.

Sources:
- a plain text file (read as-is);
- `wikitext-2` (alias): the shared `wiki.valid.tokens` file (the evaluation split is refused);
- `hf:NAME[:CONFIG]:SPLIT[:COLUMN]`: a Hugging Face dataset loaded with `datasets.load_dataset`;
  rows are joined with blank lines. NAME may be a local dataset folder. SPLIT may slice
  (`validation[:200]`). COLUMN defaults to `text`.

The whole text is tokenized once, then windows are taken from the start (the reference protocol:
16 x 512 tokens from the start of wiki.valid.tokens) or sampled at random offsets by seed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgecompress.errors import EdgeCompressError

WIKITEXT_DIR_ENV = "EDGECOMPRESS_WIKITEXT_DIR"
WIKITEXT_CALIBRATION_FILE = "wiki.valid.tokens"
# The evaluation split: calibrating on it would leak the test set into the compression.
WIKITEXT_TEST_FILES = ("wiki.test.raw", "wiki.test.tokens")
WIKITEXT_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
SAMPLING_MODES = ("start", "random")


@dataclass
class CalibrationSet:
    """Token windows [n, seq_len] (int64) and where they came from."""

    input_ids: "torch.Tensor"  # noqa: F821  (torch is imported lazily)
    source: str
    source_sha256: str
    seed: int
    sampling: str = "start"
    extra: dict = field(default_factory=dict)

    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def content_hash(self) -> str:
        """sha256 of the exact token windows plus how they were drawn."""
        digest = hashlib.sha256()
        digest.update(self.input_ids.contiguous().cpu().numpy().astype("<i8").tobytes())
        digest.update(f"{self.n_sequences}x{self.seq_len}|{self.sampling}|{self.seed}".encode())
        digest.update(self.source_sha256.encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        """JSON-ready metadata (no tokens)."""
        return {
            "source": self.source,
            "source_sha256": self.source_sha256,
            "n_sequences": self.n_sequences,
            "seq_len": self.seq_len,
            "sampling": self.sampling,
            "seed": self.seed,
            "hash": self.content_hash(),
        }


def default_wikitext_dir() -> Path:
    """The shared WikiText-2 folder: $EDGECOMPRESS_WIKITEXT_DIR, else ../shared/data/wikitext-2."""
    if os.environ.get(WIKITEXT_DIR_ENV):
        return Path(os.environ[WIKITEXT_DIR_ENV])
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data" / "wikitext-2"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _refuse_test_split_file(path: Path, text: str) -> None:
    if path.name in WIKITEXT_TEST_FILES or _sha256_text(text) == WIKITEXT_TEST_SHA256:
        raise EdgeCompressError(
            f"{path} is the WikiText-2 evaluation (test) split; calibrate on "
            f"{WIKITEXT_CALIBRATION_FILE} or another text instead"
        )


def _split_spec(spec: str) -> list[str]:
    """Split on ':' but not inside [...] so split slices like `train[:100]` survive."""
    parts, current, depth = [], "", 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
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
        name, split = parts
        config, column = None, "text"
    elif len(parts) == 3:
        name, config, split = parts
        column = "text"
    elif len(parts) == 4:
        name, config, split, column = parts
    else:
        raise EdgeCompressError(f"bad dataset spec {spec!r}: expected hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    if not name or not split:
        raise EdgeCompressError(f"bad dataset spec {spec!r}: NAME and SPLIT are required")
    return {"name": name, "config": config or None, "split": split, "column": column or "text"}


def _load_hf_text(spec: str) -> str:
    fields = parse_hf_spec(spec)
    split_name = fields["split"].split("[")[0]
    if "wikitext" in fields["name"].lower() and split_name == "test":
        raise EdgeCompressError(
            f"{spec} is the WikiText evaluation (test) split; calibrate on the validation or train split"
        )
    try:
        import datasets
    except ImportError as exc:  # optional dependency
        raise EdgeCompressError("Hugging Face datasets is not installed: pip install datasets") from exc
    try:
        dataset = datasets.load_dataset(fields["name"], fields["config"], split=fields["split"])
    except Exception as exc:  # network, missing folder, unknown split: all user-facing
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeCompressError(f"cannot load dataset {spec}: {first_line}") from exc
    if fields["column"] not in dataset.column_names:
        raise EdgeCompressError(
            f"dataset {spec} has no column {fields['column']!r} (columns: {', '.join(dataset.column_names)})"
        )
    return "\n\n".join(str(row) for row in dataset[fields["column"]])


def load_calibration_text(source: str | os.PathLike) -> tuple[str, str]:
    """Return (text, description) for a calibration source. Refuses the evaluation split."""
    source_str = os.fspath(source)
    if source_str.startswith("hf:"):
        return _load_hf_text(source_str), source_str
    if source_str in ("wikitext-2", "wikitext2"):
        path = default_wikitext_dir() / WIKITEXT_CALIBRATION_FILE
    else:
        path = Path(source_str)
    if not path.is_file():
        raise EdgeCompressError(f"calibration text {path} does not exist")
    text = path.read_text(encoding="utf-8")
    _refuse_test_split_file(path, text)
    return text, str(path)


def _tokenize(tokenizer, text: str) -> list[int]:
    """Whole text at once, no special tokens: windows are plain slices of one token stream."""
    if hasattr(tokenizer, "model_max_length"):
        # Avoid the harmless "sequence longer than max" warning for a whole corpus.
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    else:
        encoded = tokenizer(text, add_special_tokens=False)
    return list(encoded["input_ids"])


def windows_from_tokens(tokens, n_sequences: int, seq_len: int, sampling: str = "start", seed: int = 0):
    """Cut [n_sequences, seq_len] windows from one token stream: consecutive from the start, or
    random offsets drawn by `seed` (windows may overlap, like SparseGPT's sampler)."""
    import torch

    if n_sequences < 1 or seq_len < 2:
        raise EdgeCompressError(f"need at least 1 sequence of 2 tokens, got {n_sequences} x {seq_len}")
    if sampling not in SAMPLING_MODES:
        raise EdgeCompressError(f"unknown sampling {sampling!r}: use one of {', '.join(SAMPLING_MODES)}")
    stream = torch.as_tensor(tokens, dtype=torch.int64)
    total = int(stream.numel())
    if total < seq_len:
        raise EdgeCompressError(
            f"calibration text has {total} tokens, shorter than one sequence of {seq_len}"
        )
    if sampling == "start":
        available = total // seq_len
        if available < n_sequences:
            raise EdgeCompressError(
                f"calibration text has {total} tokens: {available} sequences of {seq_len} from the "
                f"start, {n_sequences} asked (use fewer, shorter, or sampling='random')"
            )
        return stream[: n_sequences * seq_len].reshape(n_sequences, seq_len).clone()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (n_sequences,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def build_calibration(
    source: str | os.PathLike,
    tokenizer,
    n_sequences: int = 16,
    seq_len: int = 512,
    seed: int = 0,
    sampling: str = "start",
) -> CalibrationSet:
    """Load `source`, tokenize it once with `tokenizer` (an HF tokenizer) and cut the windows."""
    text, description = load_calibration_text(source)
    tokens = _tokenize(tokenizer, text)
    input_ids = windows_from_tokens(tokens, n_sequences, seq_len, sampling=sampling, seed=seed)
    return CalibrationSet(
        input_ids=input_ids,
        source=description,
        source_sha256=_sha256_text(text),
        seed=seed,
        sampling=sampling,
    )
