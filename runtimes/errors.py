"""The runtime's own error type: torch-free, so apps that embed the runtime can catch it.

The edgecompress API turns it into `EdgeCompressError` (one line on the CLI); an app catches it directly.
"""


class ArtifactRuntimeError(Exception):
    """A problem with the artifact folder or the request (missing file, hash mismatch, prompt too long...)."""
