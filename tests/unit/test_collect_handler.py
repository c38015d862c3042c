"""The handler as the kernel runs it (a process, empty environment, core on stdin), without the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import zstandard
from support import core_digest

from corepipe.platform.kernel import RLIM_INFINITY

CORE = b"\x7fELF" + os.urandom(200_000) + b"\0" * 500_000


def _collect(tmp_path: Path, argv: list, core: bytes = CORE, store: Path | None = None,
             config_extra: str = "") -> tuple:
    store = store or tmp_path / "store"
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{store}"\n{config_extra}')
    src = tmp_path / "core.in"
    src.write_bytes(core)
    with open(src, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "corepipe", "collect", "--config", str(config), *argv],
                              stdin=stdin, capture_output=True, env={}, cwd="/", timeout=60)
    records = [json.loads(p.read_text()) for p in store.rglob("record.json")] if store.is_dir() else []
    return proc, records


def _args(pid: int, limit: int = RLIM_INFINITY) -> list:
    return [str(pid), str(pid), str(pid), str(os.getuid()), str(os.getgid()), "11",
            str(int(time.time())), str(limit),
            "1", "-", "box", "sleepy"]


def test_stores_core_and_record_prints_nothing(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        proc, records = _collect(tmp_path, _args(child.pid))
    finally:
        child.kill()
        child.wait()
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""
    [rec] = records
    assert rec["status"] == "complete" and rec["pid"] == child.pid and rec["cmdline"] == ["sleep", "30"]
    assert rec["process"]["trusted"] is True
    core_file = next((tmp_path / "store").rglob("core.zst"))
    decompressor = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    assert decompressor.decompress(core_file.read_bytes()) == CORE
    assert rec["core"]["digest"] == core_digest(CORE) and rec["core"]["size"] == len(CORE)
    assert oct(core_file.stat().st_mode & 0o777) == "0o600"
    assert oct(core_file.parent.stat().st_mode & 0o777) == "0o700"


def test_process_gone_before_snapshot_still_stores_core(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    proc, [rec] = _collect(tmp_path, _args(child.pid))
    assert proc.returncode == 0
    assert rec["core"]["stored"] is True and rec["core"]["size"] == len(CORE)
    assert rec["process"]["trusted"] is False and rec["container"]["runtime"] == "unknown"
    assert any("/proc" in e for e in rec["process"]["errors"])


def test_bad_arguments_still_store_under_unknown(tmp_path: Path) -> None:
    proc, [rec] = _collect(tmp_path, ["garbage", "x"])
    assert proc.returncode == 2
    assert rec["pid"] is None and rec["container"]["runtime"] == "unknown"
    assert rec["core"]["stored"] is True
    assert any("expected 12 kernel arguments" in e for e in rec["collector"]["errors"])
    assert [p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == ["unknown"]


def test_unwritable_store_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc, records = _collect(tmp_path, _args(os.getpid()), store=blocker / "store")
    assert proc.returncode == 1 and proc.stdout == b"" and proc.stderr == b""
    assert records == []


def test_invalid_config_key_is_reported_and_defaulted(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        proc, [rec] = _collect(tmp_path, _args(child.pid), config_extra='compression_level = "high"\nbogus = 1\n')
    finally:
        child.kill()
        child.wait()
    assert proc.returncode == 1 and proc.stderr == b""
    assert rec["core"]["stored"] is True and rec["status"] == "failed"
    errors = " ".join(rec["collector"]["errors"])
    assert "compression_level must be int" in errors and "unknown key 'bogus'" in errors


def test_zero_core_limit_reads_nothing(tmp_path: Path) -> None:
    proc, [rec] = _collect(tmp_path, _args(os.getpid(), limit=0))
    assert proc.returncode == 0
    assert rec["core"]["stored"] is False and not list((tmp_path / "store").rglob("core.zst"))
