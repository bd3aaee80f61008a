"""The runtime's errors, in the package's one hierarchy (`EdgeCompressError`, torch-free).

An app that embeds the runtime catches `ArtifactRuntimeError`; the CLI prints it as one line.
"""

from edgecompress.errors import EdgeCompressError


class ArtifactRuntimeError(EdgeCompressError):
    """A problem with the artifact folder or the request (missing file, hash mismatch, prompt too long...)."""


class RuntimeLoadError(ArtifactRuntimeError):
    """onnxruntime cannot open the artifact (missing file, bad graph, missing op library)."""
