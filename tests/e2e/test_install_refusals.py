"""What install, uninstall and status promise about other handlers and broken installs, checked through the real
kernel: after each step a real crash shows who the kernel hands cores to.

- uninstall leaves a handler that took over since install alone (the next crash goes to it) unless ``--force``;
- install refuses a foreign socket pattern (``@...``) in one line without ``--force``, and changes nothing;
- install as a non-root user is refused in one line before anything changes;
- status exits 5 (broken) when the installed pattern is active but its launcher is gone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
from support import CORE_PATTERN, PIPE_LIMIT, KernelSettings, crash, need, need_root_kernel, wait_for

from corepipe.domain import catalog


@pytest.fixture
def settings() -> KernelSettings:
    """The kernel settings saved and restored, and a plain file pattern meanwhile: what install finds on a host
    without a handler, even where corepipe is installed for real (whose pattern install would refuse)."""
    need_root_kernel()
    with KernelSettings() as ks:
        ks.set(NEUTRAL, pipe_limit=0)
        yield ks


NEUTRAL = "core"


def cli(*args: str, user: Optional[int] = None) -> subprocess.CompletedProcess:
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run([*prefix, sys.executable, "-m", "corepipe", *args], capture_output=True, text=True,
                          timeout=300, cwd="/")


def install_args(d: Path) -> list:
    return ["--config", f"{d}/c.toml", "--bin", f"{d}/b", "--sysctl-dir", f"{d}/sd", "--store", f"{d}/s"]


def records(d: Path) -> list:
    return [rec for _path, rec in catalog.iter_records(f"{d}/s")] if Path(d, "s").exists() else []


def foreign_handler(d: Path) -> tuple:
    """A foreign pipe handler that counts the cores it is given (a file per crash in ``d/foreign``)."""
    out = d / "foreign"
    out.mkdir()
    script = d / "foreign.sh"
    script.write_text(f"#!/bin/sh\ncat > {out}/core.$1\n")
    script.chmod(0o755)
    return f"|{script} %P", out


def test_uninstall_leaves_a_handler_that_took_over_unless_forced(settings: KernelSettings, handler_dir: Path,
                                                                  crasher: Path) -> None:
    d = handler_dir
    pattern, got = foreign_handler(d)
    assert cli("install", *install_args(d)).returncode == 0
    settings.set(pattern, pipe_limit=4)  # another handler takes over after install
    proc = cli("uninstall", "--config", f"{d}/c.toml")
    assert proc.returncode == 0, proc.stderr
    assert "--force" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert CORE_PATTERN.read_text().rstrip("\n") == pattern and PIPE_LIMIT.read_text() == "4\n"
    crash([str(crasher), "0", "after-uninst"])
    wait_for(lambda: list(got.iterdir()), 30, "the foreign handler to get the crash")
    assert records(d) == []

    # Again, forced: the kernel settings saved at install come back.
    settings.set(NEUTRAL, pipe_limit=0)
    assert cli("install", *install_args(d)).returncode == 0
    settings.set(pattern, pipe_limit=4)
    proc = cli("uninstall", "--force", "--config", f"{d}/c.toml")
    assert proc.returncode == 0, proc.stderr
    assert CORE_PATTERN.read_text() == f"{NEUTRAL}\n" and PIPE_LIMIT.read_text() == "0\n"


def test_install_refuses_a_foreign_socket_pattern(settings: KernelSettings, handler_dir: Path,
                                                  crasher: Path) -> None:
    d = handler_dir
    modes = Path("/proc/sys/kernel/core_modes")
    need(modes.exists() and "socket" in modes.read_text().split(), "needs a kernel with coredump socket mode (6.16+)")
    path = d / "foreign.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    cores: list = []

    def drain() -> None:
        try:
            conn = listener.accept()[0]
        except OSError:
            return
        with conn:
            size = 0
            while chunk := conn.recv(1 << 16):
                size += len(chunk)
        cores.append(size)

    threading.Thread(target=drain, daemon=True).start()
    try:
        settings.set(f"@{path}", pipe_limit=5)
        proc = cli("install", *install_args(d))
        assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "--force" in proc.stderr and str(path) in proc.stderr, proc.stderr
        assert CORE_PATTERN.read_text() == f"@{path}\n" and PIPE_LIMIT.read_text() == "5\n"
        assert os.listdir(d) == ["foreign.sock"]
        crash([str(crasher), "0", "to-foreign"])
        wait_for(lambda: cores, 30, "the foreign socket to get the core")
        assert cores[0] > 0
    finally:
        listener.close()


def test_install_as_a_user_is_refused_in_one_line(settings: KernelSettings, handler_dir: Path) -> None:
    d = handler_dir
    need(subprocess.run(["which", "setpriv"], capture_output=True).returncode == 0, "needs setpriv (util-linux)")
    proc = cli("install", *install_args(d), user=65534)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "root" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(d) == []
    assert CORE_PATTERN.read_text() == f"{NEUTRAL}\n" and PIPE_LIMIT.read_text() == "0\n"


def test_status_is_broken_when_the_launcher_is_gone(settings: KernelSettings, handler_dir: Path,
                                                    crasher: Path) -> None:
    d = handler_dir
    assert cli("install", *install_args(d)).returncode == 0
    crash([str(crasher), "0", "before"])
    wait_for(lambda: [r for r in records(d) if r["comm"] == "before" and r["status"] != "collecting"], 30,
             "the crash before the launcher is removed")
    Path(d, "b").unlink()
    proc = cli("status", "--config", f"{d}/c.toml")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "launcher" in proc.stdout, proc.stdout
    crash([str(crasher), "0", "nolauncher"])  # the kernel cannot start the handler: nothing is recorded
    assert [r for r in records(d) if r["comm"] == "nolauncher"] == []
    assert cli("install", *install_args(d)).returncode == 0  # install mends it
    assert cli("status", "--config", f"{d}/c.toml").returncode == 0
    crash([str(crasher), "0", "mended"])
    wait_for(lambda: [r for r in records(d) if r["comm"] == "mended" and r["status"] != "collecting"], 30,
             "the crash after install mended it")
    assert cli("uninstall", "--purge", "--config", f"{d}/c.toml").returncode == 0
