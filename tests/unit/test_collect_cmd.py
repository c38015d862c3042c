"""``corepipe collect`` run by a person, not the kernel (issue 31): it prints its help or one usage line and
files nothing, through the real launcher; the kernel's call still files its crash."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from corepipe.platform import launcher
from corepipe.platform.kernel import RLIM_INFINITY

CORE = b"\x7fELF" + bytes(50_000)


@pytest.fixture
def setup(tmp_path: Path) -> tuple:
    """(launcher, config) in tmp_path; the config's store is tmp_path/store."""
    script = tmp_path / "corepipe"
    script.write_text(launcher.script())
    script.chmod(0o755)
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\n')
    return script, config


def _records(tmp_path: Path) -> list:
    return list((tmp_path / "store").rglob("record.json")) if (tmp_path / "store").exists() else []


def _kernel_args(pid: int, comm: str = "sleepy") -> list:
    return [str(pid), str(pid), str(pid), str(os.getuid()), str(os.getgid()), "11",
            str(int(time.time())), str(RLIM_INFINITY),
            "1", "-", "box", comm]


def _run(script: Path, args: list, stdin: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], stdin=stdin, capture_output=True, text=True, env={}, cwd="/",
                          timeout=60)


@pytest.mark.parametrize("args", [["collect", "--help"], ["collect", "--config", "{c}", "--help"], ["collect", "-h"],
                                  ["--config", "{c}", "collect", "--help"]])
def test_help_prints_and_files_nothing(setup: tuple, tmp_path: Path, args: list) -> None:
    script, config = setup
    proc = _run(script, [a.replace("{c}", str(config)) for a in args], subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: corepipe collect") and "files nothing" in proc.stdout
    assert _records(tmp_path) == []


@pytest.mark.parametrize("args", [["collect"], ["collect", "--config", "{c}"], ["--config", "{c}", "collect"],
                                  ["--config", "{c}", "collect", "1", "2"]])
def test_no_kernel_arguments_is_a_usage_error(setup: tuple, tmp_path: Path, args: list) -> None:
    """No %-arguments on a stdin that is not a terminal (a script, cron, CI): exit 2, one line, nothing filed."""
    script, config = setup
    proc = _run(script, [a.replace("{c}", str(config)) for a in args], subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("corepipe collect: error: not run by the kernel") and "nothing was filed" in line
    assert _records(tmp_path) == []


def test_a_terminal_on_stdin_files_nothing(setup: tuple, tmp_path: Path) -> None:
    """Every kernel argument, for a live process, but stdin is a terminal: not the kernel's pipe."""
    script, config = setup
    child = subprocess.Popen(["sleep", "30"])
    controller, terminal = os.openpty()
    try:
        proc = _run(script, ["collect", "--config", str(config), *_kernel_args(child.pid)], terminal)
    finally:
        os.close(terminal)
        os.close(controller)
        child.kill()
        child.wait()
    assert proc.returncode == 2 and "not run by the kernel" in proc.stderr, proc.stderr
    assert _records(tmp_path) == []


def test_a_process_named_help_is_still_collected(setup: tuple, tmp_path: Path) -> None:
    """%e (the comm) is the kernel's last argument and chosen by the crashing process: ``--help`` there must not
    keep its crash from being filed."""
    script, config = setup
    core = tmp_path / "core"
    core.write_bytes(CORE)
    child = subprocess.Popen(["sleep", "30"])
    try:
        with open(core, "rb") as stdin:
            proc = _run(script, ["collect", "--config", str(config), *_kernel_args(child.pid, "--help")], stdin)
    finally:
        child.kill()
        child.wait()
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    assert len(_records(tmp_path)) == 1



@pytest.mark.parametrize("option", ["--version", "-v"])
def test_an_option_first_is_a_person_not_the_kernel(setup: tuple, tmp_path: Path, option: str) -> None:
    """The kernel's first argument is a PID: any option there (and a core on stdin all the same) files nothing."""
    script, config = setup
    core = tmp_path / "core"
    core.write_bytes(CORE)
    with open(core, "rb") as stdin:
        proc = _run(script, ["collect", "--config", str(config), option, *_kernel_args(os.getpid())[1:]], stdin)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert _records(tmp_path) == []
