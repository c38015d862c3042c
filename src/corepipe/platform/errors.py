"""The one error base for what a user is told: a single line and an exit code, caught once in cli.

Every layer may raise it (or a subclass); only cli.py prints it. The collect path never lets it out:
there every failure is logged and recorded instead.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure to report as one line on stderr, saying what to do; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
