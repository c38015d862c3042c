"""The collect pipeline called in-process, as a second entry point (a socket server) calls it: its own
core fd and KernelArgs built without the kernel's argv, no subprocess, no SIGALRM, no stdin."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import zstandard

from corepipe.platform import capture
from corepipe.platform.config import Config
from corepipe.platform.kernel import RLIM_INFINITY, KernelArgs
from corepipe.services import collect

CORE = b"\x7fELF" + os.urandom(300_000) + b"\0" * 3_000_000


def _feed(fd: int, data: bytes) -> threading.Thread:
    """Write ``data`` to the pipe ``fd`` from a thread (it is bigger than a pipe holds), then close it."""
    def write() -> None:
        with open(fd, "wb") as f:
            f.write(data)
    thread = threading.Thread(target=write)
    thread.start()
    return thread


def _crash(store: Path, child: subprocess.Popen, comm: str) -> tuple:
    pidfd = os.pidfd_open(child.pid)
    read, write = os.pipe()
    feeder = _feed(write, CORE)
    try:
        # What a server knows from SO_PEERCRED / its peer's pidfd, as KernelArgs.
        args = KernelArgs(pid=child.pid, ns_pid=child.pid, tid=child.pid, uid=os.getuid(), gid=os.getgid(),
                          signal=11, time=1700000000, core_limit=RLIM_INFINITY, dump_mode=1, pidfd=pidfd,
                          hostname="box", comm=comm)
        early = capture.take_process(child.pid, pidfd, read)
        code = collect.collect(args, early, core_fd=read, cfg=Config(store=str(store), backtrace=False))
        feeder.join(30)
        released = os.readlink(f"/proc/self/fd/{read}")
    finally:
        os.close(read)
        os.close(pidfd)
    return code, released


def test_collect_in_process_with_its_own_core_fd(tmp_path: Path) -> None:
    store = tmp_path / "store"
    stdin_before = os.fstat(0)
    alarm_before = signal.getsignal(signal.SIGALRM)
    child = subprocess.Popen(["sleep", "30"])
    try:
        results = [_crash(store, child, f"inproc{n}") for n in range(2)]
    finally:
        child.kill()
        child.wait()
    # Exit code 0 each time, the caller's fd let go (now /dev/null), stdin and SIGALRM left alone.
    assert results == [(0, os.devnull), (0, os.devnull)]
    assert (os.fstat(0).st_ino, os.fstat(0).st_dev) == (stdin_before.st_ino, stdin_before.st_dev)
    assert signal.getsignal(signal.SIGALRM) == alarm_before
    records = sorted((json.loads(p.read_text()) | {"_dir": p.parent} for p in store.rglob("record.json")),
                     key=lambda r: r["comm"])
    assert [r["comm"] for r in records] == ["inproc0", "inproc1"]
    for rec in records:
        assert rec["status"] == "complete" and rec["pid"] == child.pid and rec["process"]["trusted"] is True
        assert rec["cmdline"] == ["sleep", "30"] and rec["container"]["runtime"] == "host"
        core = rec["core"]
        assert core["stored"] and core["file"] == "core.zst" and core["size"] == len(CORE)
        with open(rec["_dir"] / core["file"], "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        assert data == CORE and hashlib.sha256(data).hexdigest() == core["sha256"]
