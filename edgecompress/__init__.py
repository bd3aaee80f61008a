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


def eval(*args, **kwargs):  # noqa: A001 - the CLI verb's name
    """Perplexity of an artifact through onnxruntime."""
    from edgecompress.api import eval as _eval

    return _eval(*args, **kwargs)


def generate(*args, **kwargs):
    """Generate text from an artifact with the runtime-only generator."""
    from edgecompress.api import generate as _generate

    return _generate(*args, **kwargs)


__all__ = ["EdgeCompressError", "build", "eval", "generate", "inspect", "targets", "__version__"]
