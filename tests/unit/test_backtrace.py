"""The collection-time backtrace's child: bounded output and time, no privileges, fds only."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from support import need, short_tempdir

from corepipe.domain import backtrace
from corepipe.domain.binaries import Held, HeldFiles


def _popen(argv: list) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)


def test_output_is_bounded() -> None:
    proc = _popen(["head", "-c", str(backtrace.MAX_OUTPUT * 3), "/dev/zero"])
    output, truncated, timed_out = backtrace._read(proc, time.monotonic() + 60)
    assert len(output) == backtrace.MAX_OUTPUT and truncated and not timed_out


def test_time_is_bounded_and_the_session_killed() -> None:
    proc = _popen(["sh", "-c", "sleep 60 & echo started; wait"])
    started = time.monotonic()
    output, _truncated, timed_out = backtrace._read(proc, time.monotonic() + 0.5)
    assert timed_out and output == b"started\n" and proc.returncode == -9
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10  # the killed sleep is reaped by whoever inherits it
    while subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a process of the killed session is still there"
        time.sleep(0.05)


def test_child_runs_as_nobody_without_new_privileges_and_reads_only_fds(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to drop privileges")
    bin_dir = short_tempdir()
    try:
        bin_dir.chmod(0o755)
        tool = bin_dir / "fake-debugger"
        # Prints who it runs as, then the first bytes of the core (its last argument) and of the exe link.
        tool.write_text('#!/bin/sh\nid -u\ngrep NoNewPrivs /proc/self/status\nfor last; do :; done\n'
                        'head -c 5 "$last"; echo; touch /proc/x 2>/dev/null; id -G\n')
        tool.chmod(0o755)
        core, exe = tmp_path / "core", tmp_path / "exe"  # in a 0700 directory: reachable through fds only
        core.write_bytes(b"CORE!rest")
        exe.write_bytes(b"EXE")
        core_fd = os.open(core, os.O_RDONLY)
        exe_fd = os.open(exe, os.O_RDONLY)
        os.fchown(core_fd, *backtrace._nobody())
        work = short_tempdir()
        try:
            held = HeldFiles(files=[Held(path="/app/exe", fd=exe_fd, exe=True)])
            text, truncated, error = backtrace._run(str(tool), core_fd, held, str(work), 30, "marker: ")
        finally:
            os.close(core_fd)
            os.close(exe_fd)
            shutil.rmtree(work)
        uid, gid = backtrace._nobody()
        assert error is None and not truncated
        assert text.splitlines() == [str(uid), "NoNewPrivs:\t1", "CORE!", str(gid)], text
    finally:
        shutil.rmtree(bin_dir)
