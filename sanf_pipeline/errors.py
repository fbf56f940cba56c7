"""The one user-facing error type.

Every failure a user can cause or fix (bad input, a mismatched cache, a full disk) is raised as
``SanfError("what went wrong; what to do")``. The CLI prints it as one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class SanfError(Exception):
    """A failure the user can act on; its message is one line."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class BadImageError(SanfError):
    """An image file that cannot be decoded into an RGB uint8 array."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {path}: {reason}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying one line that says exactly what was kept (the CLI prints it after "interrupted; ")."""
