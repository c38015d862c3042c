"""The collect pipeline called in-process, as a second entry point (a socket server) calls it: its own
core fd and KernelArgs built without the kernel's argv, no subprocess, no SIGALRM, no stdin."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from inprocess import collect_in_process
from support import core_digest

from corepipe.platform.config import Config

CORE = b"\x7fELF" + os.urandom(300_000) + b"\0" * 3_000_000


def test_collect_in_process_with_its_own_core_fd(tmp_path: Path) -> None:
    cfg = Config(store=str(tmp_path / "store"), backtrace=False)
    stdin_before = os.fstat(0)
    alarm_before = signal.getsignal(signal.SIGALRM)
    child = subprocess.Popen(["sleep", "30"])
    try:
        results = [collect_in_process(cfg, child.pid, f"inproc{n}", CORE) for n in range(2)]
    finally:
        child.kill()
        child.wait()
    # Exit code 0 each time, the caller's fd let go (now /dev/null), stdin and SIGALRM left alone.
    assert [(code, released) for code, released, _rec in results] == [(0, os.devnull), (0, os.devnull)]
    assert (os.fstat(0).st_ino, os.fstat(0).st_dev) == (stdin_before.st_ino, stdin_before.st_dev)
    assert signal.getsignal(signal.SIGALRM) == alarm_before
    assert [rec["comm"] for _code, _released, rec in results] == ["inproc0", "inproc1"]
    for _code, _released, rec in results:
        assert rec["status"] == "complete" and rec["pid"] == child.pid and rec["process"]["trusted"] is True
        assert rec["cmdline"] == ["sleep", "30"] and rec["container"]["runtime"] == "host"
        core = rec["core"]
        assert core["stored"] and core["file"] == "core.zst" and core["size"] == len(CORE)
        with open(rec["_dir"] / core["file"], "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        assert data == CORE and core_digest(data) == core["digest"]


def test_a_crash_measures_its_filesystem_once_per_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One statvfs per measurement, and the limits (from the filesystem's size) measured once per crash: before
    its first record, then under the lock for the core's admission (a stored core) or for the final record (no
    core), the free space anew as it changes; saved binaries leave that crash's keep_free, one statvfs per file
    they would copy."""
    calls: list = []
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda where: (calls.append(where), real(where))[1])
    plain = Config(store=str(tmp_path / "store"), backtrace=False, binaries=False, rate_limit_exe=0)
    cases = {"stored": plain, "coreless": replace(plain, exclude_executables=["*"]),
             "binaries": replace(plain, binaries=True, binaries_host=True)}
    child = subprocess.Popen(["sleep", "30"])
    try:
        for comm, cfg in cases.items():
            calls.clear()
            _code, _released, rec = collect_in_process(cfg, child.pid, comm, CORE)
            assert rec["status"] == "complete" and rec["core"]["stored"] is (comm != "coreless"), rec["core"]
            copied = [e for e in (rec.get("binaries") or {}).get("files", [])
                      if e["stored"] or "keep_free" in (e["reason"] or "")]
            assert (comm == "binaries") == bool(copied), rec.get("binaries")
            assert len(calls) == 2 + len(copied), (comm, calls)
    finally:
        child.kill()
        child.wait()
