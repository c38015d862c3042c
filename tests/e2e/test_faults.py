"""Faults: disk full, read-only or missing store, bad config, killed handler or process, short input, no room.

In each case no file under a final name is partial, the record (where one can be written)
says what happened, the failure is logged, and the next crash is handled normally.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from support import (
    Handler,
    collect_by_hand,
    core_digest,
    crash,
    decompress,
    dmesg_lines,
    host_dir,
    installed_handler,
    mounted_tmpfs,
    short_tempdir,
    start_crash,
    wait_for,
    wait_log,
)

DEFAULT_STORE = Path("/var/lib/corepipe")


@pytest.fixture(scope="module")
def real_core(crasher: Path) -> bytes:
    """An uncompressed core of the crasher with 16 MiB of heap (4 MiB of it random), made by the kernel."""
    workdir = short_tempdir()
    workdir.chmod(0o755)
    try:
        with installed_handler(workdir) as handler:
            crash([str(crasher), "16", "real"])
            rec = handler.wait_record(lambda r: r["comm"] == "real")
        return decompress(Path(rec["_dir"]) / "core.zst", workdir / "core")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def temp_files(store: Path) -> list:
    return sorted(store.rglob(".core.zst.*.tmp")) if store.exists() else []


def assert_next_crash_is_normal(handler: Handler, crasher: Path, name: str) -> dict:
    crash([str(crasher), "0", name])
    rec = handler.wait_record(lambda r: r["comm"] == name)
    assert rec["status"] == "complete" and rec["core"]["stored"] and rec["core"]["complete"], rec["core"]
    handler.wait_idle()  # its ledger is written after the record: the next fault must not race it
    return rec


def assert_only_complete_cores(store: Path, tmp: Path, expected: set) -> None:
    """The cores under their final name are those of the crashes ``expected`` (ids), and each decompresses
    whole and matches its record's digest."""
    found = set()
    for core in store.rglob("core.zst"):
        rec = json.loads((core.parent / "record.json").read_text())
        data = decompress(core, tmp / "check")
        assert core_digest(data) == rec["core"]["digest"]
        found.add(rec["id"])
    assert found == expected


def test_disk_full_during_the_write(handler_dir: Path, crasher: Path, real_core: bytes, tmp_path: Path) -> None:
    store = handler_dir / "store"
    config = "max_use = 0\nkeep_free = 0\nrate_limit_exe = 0\n"
    with mounted_tmpfs(store, "8m"), installed_handler(handler_dir, config) as handler:
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            proc = collect_by_hand(handler, sleeper.pid, "diskfull")
            proc.stdin.write(real_core[:1 << 20])
            proc.stdin.flush()
            wait_for(lambda: temp_files(store), what="the handler's temporary core")
            # Someone else fills the disk, leaving 64 KiB: the core (4 MiB random) cannot fit.
            st = os.statvfs(store)
            filler = store / "filler"
            with open(filler, "wb") as f:
                try:
                    f.write(b"\1" * (st.f_bavail * st.f_frsize - (64 << 10)))
                except OSError as exc:  # the handler wrote more meanwhile: the disk is full all the same
                    assert exc.errno == errno.ENOSPC, exc
            try:
                proc.stdin.write(real_core[1 << 20:])
            except BrokenPipeError:
                pass
            proc.stdin.close()
            code = proc.wait(timeout=60)
        finally:
            sleeper.kill()
            sleeper.wait()
        rec = handler.wait_record(lambda r: r["comm"] == "diskfull")
        assert rec["core"]["stored"] is False
        assert not temp_files(store) and not list(store.rglob("core*.zst"))
        # Either the write itself hit the full disk (a failure), or the handler, measuring the free space again
        # as the core grew past what it was admitted with, found no room and stopped first (a refusal).
        if "No space left on device" in rec["core"]["reason"]:
            assert (code, rec["status"]) == (1, "failed")
            assert dmesg_lines(f"pid {sleeper.pid}: core not saved: write failed")
        else:
            assert (code, rec["status"]) == (0, "complete")
            assert rec["core"]["reason"].startswith("no room for the core") and "free space" in rec["core"]["reason"]
        filler.unlink()
        assert_next_crash_is_normal(handler, crasher, "after-full")


def test_core_larger_than_the_free_space(handler_dir: Path, crasher: Path, tmp_path: Path) -> None:
    store = handler_dir / "store"
    with mounted_tmpfs(store, "8m"), installed_handler(handler_dir) as handler:
        crash([str(crasher), "16", "toobig"])
        rec = handler.wait_record(lambda r: r["comm"] == "toobig")
        assert rec["core"]["stored"] is False and rec["core"]["reason"].startswith("no room for the core"), rec["core"]
        assert "max_use" in rec["core"]["reason"]
        assert not temp_files(store) and not list(store.rglob("core*.zst"))
        assert wait_log(f"id {rec['id']}")  # logged after the final record is written
        small = assert_next_crash_is_normal(handler, crasher, "fits")
        assert small["core"]["compressed_size"] < (8 << 20) // 10
        assert_only_complete_cores(store, tmp_path, {small["id"]})


def test_read_only_store(kernel_handler, crasher: Path) -> None:
    assert_next_crash_is_normal(kernel_handler, crasher, "before-ro")
    store = kernel_handler.store
    kernel_handler.settings.undo_on_abort(["umount", str(store)])
    subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
        before = sorted(store.rglob("*"))
        proc = start_crash([str(crasher), "0", "readonly"])
        proc.wait(timeout=60)
        assert "Read-only file system" in wait_log(f"pid {proc.pid}: cannot create a crash directory")[0]
        assert sorted(store.rglob("*")) == before
    finally:
        subprocess.run(["umount", str(store)], check=True)
    assert_next_crash_is_normal(kernel_handler, crasher, "after-ro")


def test_store_missing_is_created(kernel_handler, crasher: Path) -> None:
    assert_next_crash_is_normal(kernel_handler, crasher, "first")
    shutil.rmtree(kernel_handler.store)
    rec = assert_next_crash_is_normal(kernel_handler, crasher, "recreated")
    assert (kernel_handler.store.stat().st_mode & 0o777) == 0o700
    assert Path(rec["_dir"]).parent == host_dir(kernel_handler.store)


@pytest.mark.parametrize("problem", ["bad toml", "a directory"])
def test_unusable_config_falls_back_to_the_defaults(kernel_handler, crasher: Path, problem: str) -> None:
    config = kernel_handler.config
    if problem == "a directory":
        config.unlink()
        config.mkdir()
    else:
        config.write_text("store = [\n")
    name = f"cfg-{problem.split()[-1]}"
    # The defaults' store is /var/lib/corepipe: a directory of this test's is mounted there for the crash, so
    # that the store of an installation on this host is neither seen nor touched.
    stand_in = kernel_handler.workdir / "default-store"
    stand_in.mkdir()
    made = not DEFAULT_STORE.exists()
    DEFAULT_STORE.mkdir(exist_ok=True)
    kernel_handler.settings.undo_on_abort(["sh", "-c", f"umount -l {DEFAULT_STORE}" + (
        f" && rmdir {DEFAULT_STORE}" if made else "")])
    subprocess.run(["mount", "--bind", str(stand_in), str(DEFAULT_STORE)], check=True)
    try:
        proc = start_crash([str(crasher), "0", name])
        proc.wait(timeout=60)

        def done() -> list:
            return [r for r in (json.loads(p.read_text()) for p in host_dir(DEFAULT_STORE).glob("*/record.json"))
                    if r["pid"] == proc.pid and r["status"] != "collecting"]
        rec = wait_for(done, what="the record in the default store")[0]
        assert rec["comm"] == name and rec["core"]["stored"]
        assert any(e.startswith("config: ") and "using the defaults" in e for e in rec["collector"]["errors"])
        assert dmesg_lines(f"pid {proc.pid}: config: ")
    finally:
        subprocess.run(["umount", "-l", str(DEFAULT_STORE)], check=True)
        if made:
            DEFAULT_STORE.rmdir()
    if problem == "a directory":
        config.rmdir()
    config.write_text(f'store = "{kernel_handler.store}"\n')
    assert_next_crash_is_normal(kernel_handler, crasher, "cfg-fixed")


@pytest.mark.parametrize("line", ["colour = 'red'", "max_use = 'a lot'", "rate_limit_exe = -3", "keep_free = -2"])
def test_a_bad_key_is_left_at_its_default(kernel_handler, crasher: Path, line: str) -> None:
    kernel_handler.config.write_text(kernel_handler.config.read_text() + line + "\n")
    crash([str(crasher), "0", "badkey"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "badkey")
    assert rec["core"]["stored"] and rec["core"]["complete"]
    assert any(e.startswith("config: ") and "left at its default" in e for e in rec["collector"]["errors"])
    assert dmesg_lines(f"pid {rec['pid']}: config: ")


def test_handler_killed_mid_write(kernel_handler, crasher: Path, tmp_path: Path) -> None:
    proc = start_crash([str(crasher), "400", "killme"])
    wait_for(lambda: temp_files(kernel_handler.store), what="the handler's temporary core")
    pids = kernel_handler.pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    rec = json.loads(next(kernel_handler.store.rglob("record.json")).read_text())
    assert rec["comm"] == "killme" and rec["status"] == "collecting" and rec["core"]["stored"] is False
    crash_dir = next(kernel_handler.store.rglob("record.json")).parent
    assert not (crash_dir / "core.zst").exists(), "a killed handler left a core under its final name"
    assert [p.name.startswith(".core.zst.") for p in crash_dir.iterdir() if p.name != "record.json"] == [True]
    after = assert_next_crash_is_normal(kernel_handler, crasher, "after-kill")
    state = json.loads((kernel_handler.store / ".state.json").read_text())
    assert rec["id"] not in state["reservations"] and after["id"] not in state["reservations"]
    assert_only_complete_cores(kernel_handler.store, tmp_path, {after["id"]})


def test_process_sigkilled_mid_dump_keeps_a_marked_partial_core(kernel_handler, crasher: Path,
                                                                 tmp_path: Path) -> None:
    proc = start_crash([str(crasher), "400", "killdump"])
    wait_for(lambda: temp_files(kernel_handler.store), what="the handler's temporary core")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "killdump")
    core = rec["core"]
    assert rec["status"] == "failed" and core["complete"] is False and core["file"] == "core.partial.zst"
    assert "the core ended after" in core["reason"] and core["reason"] in rec["collector"]["errors"]
    assert not (Path(rec["_dir"]) / "core.zst").exists()
    data = decompress(Path(rec["_dir"]) / "core.partial.zst", tmp_path / "partial")
    assert len(data) == core["size"] < 400 << 20 and core_digest(data) == core["digest"]
    assert dmesg_lines(f"pid {rec['pid']}: the core ended after")
    assert_next_crash_is_normal(kernel_handler, crasher, "after-sigkill")


def test_stdin_ending_early(kernel_handler, crasher: Path, real_core: bytes, tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for name, data in (("half", real_core[:len(real_core) // 2]), ("empty", b"")):
            proc = collect_by_hand(kernel_handler, sleeper.pid, name)
            proc.communicate(data, timeout=60)
            assert proc.returncode == 1
            rec = kernel_handler.wait_record(lambda r, name=name: r["comm"] == name)
            assert rec["status"] == "failed"
            assert not (Path(rec["_dir"]) / "core.zst").exists()
            if name == "half":
                assert rec["core"]["file"] == "core.partial.zst" and rec["core"]["complete"] is False
                assert f"ended after {len(data)} of {len(real_core)} bytes" in rec["core"]["reason"]
            else:
                assert rec["core"]["stored"] is False and "no core data" in rec["core"]["reason"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert_next_crash_is_normal(kernel_handler, crasher, "after-short")
