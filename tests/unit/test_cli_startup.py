"""The command line's start-up: a named command imports its own module and what it needs, not every command's
(each ``corepipe`` run, such as a warm ``list --remote``, pays only for itself); help, completion and a mistyped
name still see every command."""

from __future__ import annotations

import json
import subprocess
import sys

from corepipe import cli

PROBE = """import json, sys
from corepipe import cli
try:
    code = cli._main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps([code, sorted(m for m in sys.modules if m.startswith("corepipe."))]))
"""


def _run(*argv: str) -> tuple:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    code, modules = json.loads(proc.stdout.splitlines()[-1])
    return code, set(modules), proc.stdout + proc.stderr


def test_a_named_command_imports_no_other_command() -> None:
    code, modules, _ = _run("--config", "list", "list", "--help")  # --config's value is not the command
    commands = {m for m in modules if m.startswith("corepipe.commands.") and m.endswith("_cmd")}
    commands.discard("corepipe.commands.completion_cmd")  # hidden, always there (a few lines, nothing imported)
    assert code == 0 and commands == {"corepipe.commands.list_cmd"}, commands
    assert not modules & {"corepipe.services.install", "corepipe.services.serve.server", "corepipe.services.ship"}


def test_help_and_a_mistyped_name_see_every_command() -> None:
    code, modules, out = _run("--help")
    assert code == 0 and all(f"corepipe.commands.{m}" in modules for m in cli.COMMANDS.values())
    assert all(name in out for name in cli.COMMANDS)
    code, modules, out = _run("lsit")
    assert code == 2 and "invalid choice: 'lsit'" in out and "list" in out
