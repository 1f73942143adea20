"""The one exception type for errors a user can cause.

Anything a user can get wrong (a path, a column, a flag, credentials, an unreachable server)
raises `UserError` with a message that names the file, row or flag and says what to do. The CLI
prints it on one line and exits non-zero without a traceback. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A problem in the user's input or environment, reported without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        if hint:
            message = f"{message} ({hint})"
        super().__init__(message)

    def format_message(self) -> str:
        return self.message
