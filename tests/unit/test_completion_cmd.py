"""The bash completion install.sh writes (``corepipe completion bash``), run by bash as a user's TAB would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import need_tool

COMMANDS = re.compile(r"^    (\w+) ", re.MULTILINE)


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "corepipe"
    proc = subprocess.run([sys.executable, "-m", "corepipe", "completion", "bash"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    path.write_text(proc.stdout)
    return path


def complete(script: Path, *words: str, cwd: str = "/") -> list:
    """What TAB offers after ``corepipe WORDS...`` (the last word is the one being completed)."""
    bash = need_tool("bash")
    program = ('source "$1"; shift; COMP_WORDS=(corepipe "$@"); COMP_CWORD=$#; _corepipe; '
               'printf "%s\\n" "${COMPREPLY[@]}"')
    proc = subprocess.run([bash, "-c", program, "bash", str(script), *words], capture_output=True, text=True,
                          cwd=cwd, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def help_of(*command: str) -> str:
    return subprocess.run([sys.executable, "-m", "corepipe", *command, "--help"], capture_output=True, text=True,
                          timeout=60).stdout


def test_every_command_and_option_of_the_parser_completes(script: Path) -> None:
    """Checked against --help, the parser's own listing: a new command or option completes with no edit."""
    commands = COMMANDS.findall(help_of().split("positional arguments:")[1].split("options:")[0])
    assert "list" in commands and "completion" not in commands
    assert set(complete(script, "")) == set(commands) | {"-h", "--help", "--version", "--config"}
    for command in commands:
        if command == "collect":  # the kernel's handler: its arguments are the kernel's
            continue
        options = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_of(command).split("options:")[1]))
        assert set(complete(script, command, "-")) >= options, command
    assert complete(script, "li") == ["list"]
    assert complete(script, "config", "") == ["-h", "--help", "--config", "check"]  # every command takes --config
    assert "--config" in complete(script, "config", "check", "--")


def test_option_values(script: Path, tmp_path: Path) -> None:
    (tmp_path / "cores.toml").write_text("")
    (tmp_path / "cdir").mkdir()
    assert complete(script, "install", "--mode", "") == ["auto", "socket", "pipe"]
    assert complete(script, "--config", "cor", cwd=str(tmp_path)) == ["cores.toml"]
    assert complete(script, "install", "--store", "c", cwd=str(tmp_path)) == ["cdir"]
    assert complete(script, "list", "--since", "") == []
    # A value is not taken for a command: after it, the command's options complete.
    assert "--json" in complete(script, "--config", "list", "list", "--js")
