"""Errors the engine reports to users: what is wrong and how to fix it."""
from __future__ import annotations


class EngineError(Exception):
    """A problem with the user's input or environment.

    `code` is stable (the plugin and scripts may match on it), `message` says
    what is wrong, `hint` says how to fix it.
    """

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


class Cancelled(BaseException):
    """Raised in the main thread when the engine receives SIGTERM or SIGINT.

    A BaseException, like KeyboardInterrupt, so that `except Exception` blocks
    in stages do not swallow it.
    """
