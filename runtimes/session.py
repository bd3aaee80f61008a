"""onnxruntime session creation for artifacts (CPU by default, CUDA when asked and available)."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from edgecompress.contract import MODEL_FILE
from edgecompress.errors import first_line
from edgecompress.runtimes.errors import RuntimeLoadError


def model_path(artifact: str | os.PathLike) -> Path:
    """Accept the artifact folder or the .onnx file itself."""
    path = Path(artifact)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise RuntimeLoadError(f"no ONNX model at '{path}'")
    return path


def create_session(
    artifact: str | os.PathLike,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    custom_op_libraries: list[str] | None = None,
    provider_options: list[dict[str, str]] | None = None,
    profile_prefix: str | None = None,
    session_config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """`provider_options`: one dict per entry of `providers` (onnxruntime's own pairing);
    `profile_prefix`: turn on onnxruntime's profiler, writing `<prefix>_<date>.json` (end_profiling());
    `session_config`: session config entries (`session.intra_op.allow_spinning`, ...)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    for library in custom_op_libraries or []:
        options.register_custom_ops_library(str(library))
    try:
        return ort.InferenceSession(
            str(model_path(artifact)), sess_options=options, providers=providers or ["CPUExecutionProvider"],
            **({"provider_options": provider_options} if provider_options is not None else {}),
        )
    except RuntimeLoadError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise RuntimeLoadError(f"onnxruntime cannot load '{artifact}': {first_line(exc)}") from None
