"""edgecompress: an ONNX/edge deployment compiler for transformer LLMs.

The Python API has one function per CLI verb (`build`, `clean`, `inspect`, `targets`, `eval`, `generate`,
defined in edgecompress.api); the CLI (`edgecompress.cli`) is a thin layer over it. They are loaded on
first use, so `import edgecompress` (and the torch-free runtime under it) stays cheap, and
`help(edgecompress.build)` shows the real signature.
"""

from edgecompress.errors import EdgeCompressError

__version__ = "0.1.0"
_API = ("build", "clean", "eval", "generate", "inspect", "targets")


def __getattr__(name: str):
    if name in _API:
        from edgecompress import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgecompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["EdgeCompressError", "__version__", *_API]
