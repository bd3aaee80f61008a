"""User-facing errors: one hierarchy for the build, the passes and the runtime.

Anything raised as `EdgeCompressError` is a problem with the user's input or environment: the CLI
prints its message as one line and exits non-zero (the traceback only with `-v`). Everything else
is a bug and keeps its traceback. This module imports nothing, so the torch-free runtime and the
graph passes share the hierarchy.
"""


class EdgeCompressError(Exception):
    """A clear, one-line problem the user can act on."""

    exit_code = 2


class VerificationError(EdgeCompressError):
    """The export does not reproduce its reference within the stated tolerances."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
