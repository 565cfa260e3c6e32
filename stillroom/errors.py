"""Errors the CLI prints as one line, without a traceback.

UserError: what the user must fix (file, key, value, model, a full disk); exit code 2.
Stopped: the run stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint; exit 130 / 143.
"""


class UserError(Exception):
    """Bad input from the user (file, key, value, model). Its message says what to fix."""


class Stopped(Exception):
    """A run that stopped cleanly on a signal; `code` is the shell's 128 + signal number."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
