"""edgecompress: an ONNX/edge deployment compiler for transformer LLMs.

The Python API has one function per CLI verb; the CLI (`edgecompress.cli`) is a thin layer over it.
Heavy imports (torch, transformers) happen inside the functions so `import edgecompress` stays cheap.
"""

from edgecompress.errors import EdgeCompressError

__version__ = "0.1.0"


def build(*args, **kwargs):
    """Load MODEL, export it to ONNX with a KV cache, verify it and write the artifact folder."""
    from edgecompress.api import build as _build

    return _build(*args, **kwargs)


def inspect(*args, **kwargs):
    """Describe what an artifact folder holds."""
    from edgecompress.api import inspect as _inspect

    return _inspect(*args, **kwargs)


def targets(*args, **kwargs):
    """List the target profiles."""
    from edgecompress.api import targets as _targets

    return _targets(*args, **kwargs)


__all__ = ["EdgeCompressError", "build", "inspect", "targets", "__version__"]
