"""User-facing errors.

Anything raised as `EdgeCompressError` is a problem with the user's input or environment: the CLI
prints its message as one line and exits non-zero (the traceback only with `-v`). Everything else
is a bug and keeps its traceback.
"""


class EdgeCompressError(Exception):
    """A clear, one-line problem the user can act on."""

    exit_code = 2


class VerificationError(EdgeCompressError):
    """The export does not reproduce the PyTorch model within the stated tolerances."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
