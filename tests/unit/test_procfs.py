"""procfs.py, the one reader of /proc's formats: stat fields past a hostile comm, limits, cgroup, mountinfo and maps
lines, and one parse of ``status`` per crash."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from inprocess import collect_in_process

from corepipe.platform import procfs
from corepipe.platform.config import Config


def test_start_ticks_with_hostile_comm() -> None:
    stat = b"123 (a) b) (c) S 1 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10"
    assert procfs.start_ticks(stat) == 98765
    assert procfs.start_ticks(b"garbage") is None


def test_dump_signal_is_the_exit_code_field() -> None:
    """Field 52 of a dumping process's stat (as read through the real coredump socket here: 11 for SIGSEGV)."""
    fields = [b"0"] * 49 + [b"11"]
    stat = b"123 (a) b) (c) S " + b" ".join(fields[1:])
    assert len(stat.rpartition(b")")[2].split()) == 50
    assert procfs.dump_signal(stat) == 11
    assert procfs.dump_signal(stat[:-2] + b"0") is None  # not exiting
    assert procfs.dump_signal(stat[:-2] + b"139") == 11  # the core flag set once dumped
    assert procfs.dump_signal(b"123 (a) S 1 2") is None


LIMITS = ("Limit                     Soft Limit           Hard Limit           Units     \n"
          "Max cpu time              unlimited            unlimited            seconds   \n"
          "Max core file size        {soft:<20} unlimited            bytes     \n")


@pytest.mark.parametrize("soft, expected", [("0", 0), ("65536", 65536), ("unlimited", 2**64 - 1)])
def test_core_limit_from_proc_limits(soft: str, expected: int) -> None:
    assert procfs.core_limit(LIMITS.format(soft=soft).encode(), 2**64 - 1) == expected


def test_core_limit_missing() -> None:
    assert procfs.core_limit(b"", 2**64 - 1) is None


def test_this_process_as_procfs_reads_it() -> None:
    """The real /proc of this process: status, stat, mountinfo (the root mount), cgroup and maps (python itself)."""
    proc = procfs.Proc(os.getpid(), None)
    procfs.read_proc(proc)
    assert proc.opened and proc.status()["Pid"] == str(os.getpid()) and proc.status() is proc.status()
    assert procfs.start_ticks(proc.files["stat"]) == procfs.started("self")
    assert any(m.target == "/" and m.fstype for m in procfs.mounts(proc.files["mountinfo"].decode()))
    assert procfs.cgroup_entries(proc.files["cgroup"].decode())
    exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert any(m.path == exe and m.end > m.start for m in procfs.mappings(proc.files["maps"].decode()))
    assert procfs.nul_list(proc.files["cmdline"])[0].endswith(("python", "python3")) or proc.files["cmdline"]


def test_mountinfo_with_optional_fields_and_escapes() -> None:
    line = ("36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - overlay none "
            "rw,lowerdir=/a:/b,upperdir=/u,workdir=/w\n")
    [mount] = procfs.mounts(line + "garbage\n")
    assert (mount.device, mount.root, mount.target, mount.fstype, mount.source) == (
        "98:0", "/mnt1", "/mnt\\040two", "overlay", "none")
    assert mount.options == "rw,lowerdir=/a:/b,upperdir=/u,workdir=/w"


def test_status_is_parsed_once_per_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trust checks, the storage policy and the record of one crash share one parse of its status."""
    calls = []
    real = procfs.status_fields
    monkeypatch.setattr(procfs, "status_fields", lambda data: calls.append(len(data)) or real(data))
    cfg = Config(store=str(tmp_path / "store"), backtrace=False)
    child = subprocess.Popen(["sleep", "30"])
    try:
        code, _released, rec = collect_in_process(cfg, child.pid, "status-once", b"\x7fELF" + bytes(1000))
    finally:
        child.kill()
        child.wait()
    assert code == 0 and rec["process"]["trusted"] is True and rec["process"]["status"]["Pid"] == str(child.pid)
    assert len(calls) == 1, calls


def test_overlay_layers_from_its_options() -> None:
    assert procfs.overlay_layers("rw,lowerdir=/a:/b::/c,upperdir=/u,workdir=/w,uuid=on") == ["/a", "/b", "/c", "/u",
                                                                                            "/w"]
    assert procfs.overlay_layers("rw,lowerdir+=/a\\054b,datadir+=/d") == ["/a,b", "/d"]  # octal-escaped ','
    assert procfs.overlay_layers("rw,lowerdir=/a\\134:b") is None  # an escaped ':' is not read for sure
    assert procfs.overlay_layers("rw,uuid=on") is None


def test_mount_at_takes_the_longest_mount_point_and_the_last_of_equal_ones() -> None:
    table = procfs.mounts("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                          "2 1 0:40 / /srv/my\\040fuse rw - fuse.x x rw\n"
                          "3 1 0:41 / /srv rw - tmpfs tmpfs rw\n"
                          "4 3 0:42 / /srv rw - nfs server:/ rw\n")
    assert procfs.mount_at("/srv/my fuse/lower", table).device == "0:40"
    assert procfs.mount_at("/srv/other", table).device == "0:42"
    assert procfs.mount_at("/srvx", table).device == "8:1"
