"""The collection-time backtrace's child: bounded output and time, no privileges, fds only."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from support import need, short_tempdir, wait_for

from corepipe.domain import backtrace
from corepipe.domain.binaries import Held, HeldFiles
from corepipe.platform import sandbox


def _popen(argv: list) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)


def test_output_is_bounded() -> None:
    proc = _popen(["head", "-c", str(backtrace.MAX_OUTPUT * 3), "/dev/zero"])
    output, truncated, timed_out = backtrace._read(proc, time.monotonic() + 60)
    assert len(output) == backtrace.MAX_OUTPUT and truncated and not timed_out


def test_time_is_bounded_and_the_session_killed(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = _popen(["sh", "-c", f"sleep 60 & echo started; touch {ready}; wait"])
    wait_for(ready.exists, 60, "the child's output")  # the bound is short: the output must be there before
    started = time.monotonic()
    output, _truncated, timed_out = backtrace._read(proc, time.monotonic() + 0.5)
    assert timed_out and output == b"started\n" and proc.returncode == -9
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10  # the killed sleep is reaped by whoever inherits it
    while subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a process of the killed session is still there"
        time.sleep(0.05)


def test_child_runs_as_its_own_uid_without_new_privileges_and_reads_only_fds(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to drop privileges")
    bin_dir = short_tempdir()
    try:
        bin_dir.chmod(0o755)
        tool = bin_dir / "fake-debugger"
        # Prints who it runs as, then the first bytes of the core (its last argument) and of the exe link.
        tool.write_text('#!/bin/sh\nid -u\ngrep NoNewPrivs /proc/self/status\nfor last; do :; done\n'
                        f'head -c 5 "$last"; echo; touch /proc/x 2>/dev/null; id -G; ls -d {tmp_path} 2>/dev/null; '
                        'echo $?\n')
        tool.chmod(0o755)
        core, exe = tmp_path / "core", tmp_path / "exe"  # in a 0700 directory: reachable through fds only
        core.write_bytes(b"CORE!rest")
        exe.write_bytes(b"EXE")
        core_fd = os.open(core, os.O_RDONLY)
        exe_fd = os.open(exe, os.O_RDONLY)
        uid = sandbox.free_uid()
        os.fchown(core_fd, uid, uid)
        work = short_tempdir()
        try:
            held = HeldFiles(files=[Held(path="/app/exe", fd=exe_fd, exe=True)])
            text, truncated, error = backtrace._run(str(tool), core_fd, held, str(work), 30, "marker: ", uid)
        finally:
            os.close(core_fd)
            os.close(exe_fd)
            shutil.rmtree(work)
        assert error is None and not truncated
        # Only the tool itself is bound into its root: the test's directories are not there.
        assert text.splitlines()[:4] == [str(uid), "NoNewPrivs:\t1", "CORE!", str(uid)], text
        assert text.splitlines()[4:] == ["2"], text  # ls: the test's directory is not in its root
        assert uid not in (65534, 0) and str(uid) not in Path("/etc/passwd").read_text()
    finally:
        shutil.rmtree(bin_dir)


def test_a_set_uid_core_gets_no_backtrace() -> None:
    need(backtrace.find_tool() is not None, "needs gdb or eu-stack")
    result = backtrace.take(-1, "/nonexistent", {"core": {"size": 10}, "dump_mode": 2}, HeldFiles(), timeout=5,
                            max_core_size=1 << 20)
    assert result is not None and "dump mode 2" in result["error"] and result["text"] is None
