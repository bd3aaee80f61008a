"""onnxruntime session creation for artifacts (CPU by default, CUDA when asked and available)."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from edgecompress.contract import CUSTOM_OPS_LIBRARY_FILE, MODEL_FILE
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


def folder_custom_ops_library(artifact: str | os.PathLike) -> Path | None:
    """The custom-op library an artifact carries beside its model (present when the graph uses our ops)."""
    library = model_path(artifact).parent / CUSTOM_OPS_LIBRARY_FILE
    return library if library.is_file() else None


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
    `session_config`: session config entries (`session.intra_op.allow_spinning`, ...);
    `custom_op_libraries`: libraries to register; by default the one the artifact folder carries, if any."""
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
    if custom_op_libraries is None:
        carried = folder_custom_ops_library(artifact)
        custom_op_libraries = [carried] if carried else []
    if custom_op_libraries:
        from edgecompress.errors import EdgeCompressError
        from edgecompress.kernels import library as ops_library

        for library in custom_op_libraries:
            try:  # checks it loads, its version and the onnxruntime it needs, in one line
                ops_library.register(options, Path(library))
            except EdgeCompressError as exc:
                raise RuntimeLoadError(first_line(exc)) from None
    asked = providers or ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(
            str(model_path(artifact)), sess_options=options, providers=asked,
            **({"provider_options": provider_options} if provider_options is not None else {}),
        )
    except RuntimeLoadError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise RuntimeLoadError(f"onnxruntime cannot load '{artifact}': {first_line(exc)}") from None
    _check_first_provider(session, asked)
    return session


def _check_first_provider(session, asked: list) -> None:
    """onnxruntime falls back to the CPU when a provider it lists cannot start (onnxruntime-gpu without a GPU or
    its CUDA libraries): refuse that in one line rather than time or run the CPU under the provider's name."""
    first = asked[0][0] if isinstance(asked[0], tuple) else asked[0]
    if first not in session.get_providers():
        raise RuntimeLoadError(
            f"{first} is in this onnxruntime but did not start (no GPU, or its CUDA/cuDNN libraries are missing: "
            f"onnxruntime's log says which); running on {session.get_providers()[0]} instead was refused, ask for "
            f"it with --ep cpu")
