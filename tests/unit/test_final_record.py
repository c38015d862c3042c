"""Every way a collection can go wrong still ends with a final record (issue 14, items 9 and 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import host_dir
from test_collect_handler import _args, _collect

from corepipe.domain import binaries, postmortem
from corepipe.platform import capture
from corepipe.platform.config import Config
from corepipe.platform.store import FAILED
from corepipe.services import collect

NEVER_OPEN = 1 << 20  # above any fd limit here: closing it fails with EBADF, like a FLUSH that fails


def test_a_failing_close_is_reported_once_and_never_repeated(tmp_path: Path) -> None:
    real = os.open("/dev/null", os.O_RDONLY)
    held = binaries.HeldFiles(files=[binaries.Held("/lib/bad.so", NEVER_OPEN), binaries.Held("/bin/app", real, True)])
    assert held.close() == ["closing /lib/bad.so: Bad file descriptor"]
    with pytest.raises(OSError):
        os.fstat(real)  # closed, once
    assert held.close() == []  # nothing left to close twice


def test_postmortem_records_a_failing_close(tmp_path: Path) -> None:
    rec = {"pid": 1, "core": {"stored": False}, "collector": {"errors": []}}
    held = binaries.HeldFiles(files=[binaries.Held("/lib/bad.so", NEVER_OPEN)])
    postmortem.finish(None, None, rec, held, Config(binaries=False, backtrace=False), True, 0)  # type: ignore[arg-type]
    postmortem.release(rec, held)
    assert rec["collector"]["errors"] == ["binaries: closing /lib/bad.so: Bad file descriptor"]


def _collect_here(tmp_path: Path, config_extra: str = "") -> tuple:
    """The collection run in this process (stdin is the core) for a live process: (exit code, its record)."""
    store = tmp_path / "store"
    (tmp_path / "c.toml").write_text(f'store = "{store}"\n{config_extra}')
    (tmp_path / "core").write_bytes(b"\x7fELF" + b"\0" * 4096)
    child = subprocess.Popen(["sleep", "30"])
    saved = os.dup(0)
    try:
        core = os.open(tmp_path / "core", os.O_RDONLY)
        os.dup2(core, 0)
        os.close(core)
        argv = ["--config", str(tmp_path / "c.toml"), *_args(child.pid)]
        code = collect.run(argv, capture.take(argv))
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        child.kill()
        child.wait()
    [path] = store.rglob("record.json")
    return code, json.loads(path.read_text())


def test_an_unexpected_error_still_writes_a_final_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collection run in this process, with the post-mortem step failing."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(postmortem, "finish", broken)
    code, rec = _collect_here(tmp_path)
    assert code == 1
    assert rec["status"] == "failed" and "internal error RuntimeError: boom" in rec["collector"]["errors"]


def test_a_planted_link_where_the_crash_goes_is_recorded_in_failed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    top = host_dir(store).relative_to(store).parts[0]  # this process's policy group: host/<unit> or uid/<uid>
    (store / top).symlink_to(elsewhere)
    proc, records = _collect(tmp_path, _args(os.getpid()), store=store)
    assert proc.returncode == 1 and proc.stderr == b""
    assert list(elsewhere.iterdir()) == []  # the link was not followed
    [crash] = (store / FAILED).iterdir()
    rec = json.loads((crash / "record.json").read_text())
    assert rec["status"] == "failed" and rec["core"]["stored"] is False
    assert f"cannot create its directory under {top}/" in rec["core"]["reason"]
    assert oct(crash.stat().st_mode & 0o777) == "0o700" and oct((store / FAILED).stat().st_mode & 0o777) == "0o700"
    listed = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "list", "--json"],
                            capture_output=True, text=True, check=True)
    assert [item["id"] for item in json.loads(listed.stdout)] == [rec["id"]]


def test_a_failing_post_mortem_ends_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The post-mortem runs after the core is stored; its failures (here a held file whose close fails, as a FLUSH
    on FUSE or NFS does) once left the record ``complete`` with errors and the exit code 0."""
    real_hold = postmortem.hold

    def hold_a_bad_file(*args: object) -> binaries.HeldFiles:
        held = real_hold(*args)
        held.files.append(binaries.Held("/lib/bad.so", NEVER_OPEN))
        return held

    monkeypatch.setattr(postmortem, "hold", hold_a_bad_file)
    code, rec = _collect_here(tmp_path, "backtrace = false\n")
    assert code == 1
    assert rec["core"]["stored"] is True
    assert "binaries: closing /lib/bad.so: Bad file descriptor" in rec["collector"]["errors"]
    assert rec["status"] == "failed"
