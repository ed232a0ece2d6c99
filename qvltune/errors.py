"""The one exception type for problems a user can fix.

Everything the CLI reports as ``Error: ...`` (exit 1) is a ``UserError``; anything else is a bug
and gets a traceback only with ``QVLTUNE_DEBUG=1``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input or environment, with the next step to take."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:  # what logs and tracebacks show
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
