"""The one error base for what a user is told: a single line and an exit code, caught once in cli.

Every layer may raise it or a subclass of it (ConfigError, InstallError, LookupFailed, CoreError, ...: each
module's own failures a person can act on derive from it, as borg's derive from its ErrorBase); only cli.py
prints it, as ``corepipe COMMAND: error: LINE``. The collect path never lets it out: there every failure is
logged and recorded instead. Errors that never reach a person (a handoff refused, a time limit) stay plain
exceptions of their own module.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure to report as one line on stderr, saying what to do. ``code`` is the exit code (1 unless the
    class or the raise says otherwise); ``hint``, when the class has one, is the advice the message's own module
    cannot give (how the command line fixes it), added after the message by ``line``."""

    code = 1
    hint = ""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    def line(self) -> str:
        """What cli prints after ``corepipe COMMAND: error:``."""
        return f"{self}; {self.hint}" if self.hint else str(self)


class UsageError(UserError):
    """The command line asks for something that cannot be done as written (exit code 2, as argparse's)."""

    code = 2
