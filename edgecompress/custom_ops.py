"""Our `ai.edgecompress` ops on the build side: which a target enables, which a graph uses, the built
library every session of the build registers, and the copy an artifact carries.

The library is built by `make kernels` (edgecompress.kernels.library finds it); a build that needs it
and finds none stops with one line naming that command (the library module's message), and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgecompress import contract
from edgecompress.errors import EdgeCompressError, first_line
from edgecompress.kernels.reference import DOMAIN, OPS

LOW_RANK_OP = "LowRankMatMul"


class LibraryMissingError(EdgeCompressError):
    """The build needs the custom-op library and it is not built (or not loadable)."""


def not_enabled(enabled: tuple[str, ...]) -> tuple[str, ...]:
    """The ops a target does not run: the ones to lower to standard ONNX."""
    return tuple(op for op in OPS if op not in enabled)


def used_ops(model: Any) -> list[str]:
    """Our op types in an onnx-ir model's main graph, sorted."""
    return sorted({node.op_type for node in model.graph if node.domain == DOMAIN})


def library_file() -> Path:
    """The built library (edgecompress.kernels.library finds it); LibraryMissingError when there is none."""
    from edgecompress.kernels import library

    try:
        path = library.library_path()
        library.library_info(path)  # loadable, the version this package expects, a new enough onnxruntime
    except EdgeCompressError as exc:
        raise LibraryMissingError(f"this build needs our custom-op library: {first_line(exc)}") from None
    return path


def session_libraries(enabled: tuple[str, ...]) -> list[str]:
    """`custom_op_libraries` for the build's sessions: the built library when the target enables ops and
    it is built (a graph that uses our ops without it is refused where the graph is made: `require`)."""
    if not enabled:
        return []
    try:
        return [str(library_file())]
    except LibraryMissingError:
        return []


def require(model: Any) -> list[str]:
    """The ops `model` uses; LibraryMissingError when it uses some and the library is not built."""
    used = used_ops(model)
    if used:
        library_file()
    return used


def copy_into(folder: Path) -> list[str]:
    """Put the library beside the model, with its manifest (its version, ops and the cubins it ships)."""
    from edgecompress.kernels import library

    path = library_file()
    shutil.copy2(path, folder / contract.CUSTOM_OPS_LIBRARY_FILE)
    description = library.manifest(path)
    description.pop("path")  # the build machine's, meaningless in the artifact
    (folder / contract.CUSTOM_OPS_MANIFEST_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return [contract.CUSTOM_OPS_LIBRARY_FILE, contract.CUSTOM_OPS_MANIFEST_FILE]


def remove_from(folder: Path) -> None:
    for name in (contract.CUSTOM_OPS_LIBRARY_FILE, contract.CUSTOM_OPS_MANIFEST_FILE):
        (folder / name).unlink(missing_ok=True)
