"""capture.py, the handler's os-only first stage: kernel arguments, raw /proc reads, held files, the core's start."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import need, piped, wait_for

from corepipe.platform import capture, kernel, procfs

SRC = str(Path(capture.__file__).resolve().parents[2])
#: Runs capture.take in a fresh process (it takes over fd 0 and SIGALRM) and prints what it got.
PROBE = """
import hashlib, json, os, sys
sys.path.insert(0, {src!r})
from corepipe.platform import capture, memread, procfs
cap = capture.take(sys.argv[1:], core_seconds=float(os.environ.get("CORE_SECONDS", "10")))
rest = memread.read_fd(0, 1 << 30)
proc = cap.proc
print(json.dumps({{
    "core": hashlib.sha256(bytes(cap.core) + rest).hexdigest(), "prefix": len(cap.core), "rest": len(rest),
    "eof": cap.eof, "released": cap.released, "own_mounts": cap.own_mounts, "errors": cap.errors,
    "stdin": os.readlink("/proc/self/fd/0"),
    "opened": proc and proc.opened, "files": proc and sorted(proc.files), "links": proc and proc.links,
    "owner": proc and [proc.owner, proc.owner_after], "stat_again": proc and proc.stat_again is not None,
    "held": [[path, os.fstat(fd).st_ino, exe] for path, fd, exe in cap.held], "hold_errors": cap.hold_errors,
}}))
"""


def _argv(pid: int, pidfd: str = "-") -> list:
    return [str(pid), str(pid), str(pid), "0", "0", "11", "1700000000", "18446744073709551615", "1", pidfd,
            "box", "c"]


def _take(argv: list, stdin: object, env: dict | None = None, pass_fds: tuple = ()) -> dict:
    proc = subprocess.run([sys.executable, "-IS", "-c", PROBE.format(src=SRC), *argv], stdin=stdin,
                          capture_output=True, text=True, env=env or {}, pass_fds=pass_fds, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_argument_positions_match_the_kernel_pattern() -> None:
    assert capture.ARG_COUNT == len(kernel.FIELDS)
    assert kernel.FIELDS[capture.PID_AT] == "pid" and kernel.FIELDS[capture.PIDFD_AT] == "pidfd"
    for argv in (_argv(42), _argv(42, "3"), ["--config", "/c"] + _argv(7, "5"), ["9", "x"], ["x"] + _argv(1)[1:],
                 _argv(42, "bad"), [], ["--config"], ["123456789012345678901"]):
        args = kernel.parse_args(argv)
        assert capture.kernel_ids(argv) == (args.pid, args.pidfd), argv


def test_mapped_file_ranges_are_checked() -> None:
    good = "7f0000000000-7f0000001000 r--p 00000000 fd:01 99 /lib/a.so\n"
    assert capture.mapped_files(good) == [("7f0000000000-7f0000001000", "/lib/a.so", "253:1")]
    for bad in ("7f00-", "-7f00", "7F00-7f01", "7f00-7f01-7f02", "../x-1", "12345678901234567-1", "7g-1"):
        assert capture.mapped_files(good.replace("7f0000000000-7f0000001000", bad)) == [], bad


def test_small_core_is_read_whole_and_the_pipe_let_go(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    data = os.urandom(300_000) + b"\0" * 700_000
    (tmp_path / "core").write_bytes(data)
    try:
        with open(tmp_path / "core", "rb") as stdin:
            got = _take(_argv(child.pid, str(pidfd)), stdin, pass_fds=(pidfd,))
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)
    assert got["eof"] and got["released"] and got["stdin"] == "/dev/null" and got["rest"] == 0
    assert got["own_mounts"] is False
    assert got["prefix"] == len(data) and got["core"] == hashlib.sha256(data).hexdigest()
    assert got["files"] == sorted(procfs.PROC_FILES) and set(got["links"]) == set(procfs.PROC_LINKS)
    assert got["owner"] == [child.pid, child.pid] and got["stat_again"] and got["errors"] == []
    exe = os.stat(os.path.realpath("/bin/sleep")).st_ino
    assert [h for h in got["held"] if h[2]] == [[got["links"]["exe"], exe, True]]
    need(os.geteuid() == 0, "needs root: map_files needs CAP_SYS_ADMIN (for sleep's libc held too)")
    assert any(not h[2] and "libc" in h[0] for h in got["held"]), got


def test_a_container_process_keeps_the_pipe_until_it_is_identified(tmp_path: Path) -> None:
    """A mount namespace of its own: the runtime's state may vanish once the process is reaped."""
    need(os.geteuid() == 0, "needs root for a mount namespace")
    child = subprocess.Popen(["unshare", "--mount", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{child.pid}/exe") != os.path.realpath("/bin/sleep") and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp_path / "core").write_bytes(b"core")
        with open(tmp_path / "core", "rb") as stdin:
            got = _take(_argv(child.pid), stdin)
    finally:
        child.kill()
        child.wait()
    assert got["own_mounts"] is True and got["eof"] and not got["released"] and got["prefix"] == 4


def test_big_core_is_left_in_the_pipe_after_the_prefix(tmp_path: Path) -> None:
    data = os.urandom(capture.CORE_PREFIX + 123_457)
    (tmp_path / "core").write_bytes(data)
    with open(tmp_path / "core", "rb") as stdin:
        got = _take(_argv(os.getpid()), stdin)
    assert not got["eof"] and not got["released"] and got["stdin"].endswith("/core")
    assert (got["prefix"], got["rest"]) == (capture.CORE_PREFIX, 123_457)
    assert got["core"] == hashlib.sha256(data).hexdigest()


def test_a_faulted_prefix_buffer_takes_the_core_in_place() -> None:
    """What a server's idle worker makes ahead of its crash: the core read is a view of that buffer (its page
    faults are a performance figure: tests/bench/bench_prefix.py)."""
    data = os.urandom(1 << 20)
    buffer = capture.prefix_buffer()
    fd = piped(data)
    try:
        got, eof = capture.read_prefix(fd, capture.CORE_PREFIX, 10, buffer)
    finally:
        os.close(fd)
    assert eof and bytes(got) == data and got.obj is buffer.obj


def test_the_pipe_handlers_lazy_prefix_buffer_takes_the_core() -> None:
    """Without a buffer given (the pipe handler) one of CORE_PREFIX bytes is made and read into (that it costs no
    page until filled is a performance figure: tests/bench/bench_prefix.py)."""
    lazy = capture.prefix_buffer(faulted=False)
    assert len(lazy) == capture.CORE_PREFIX
    fd = piped(b"core" * 1000)
    try:
        got, eof = capture.read_prefix(fd, capture.CORE_PREFIX, 10)
    finally:
        os.close(fd)
    assert eof and bytes(got) == b"core" * 1000


def test_a_stalled_dump_is_waited_for_only_so_long() -> None:
    """A dump that stops (a hostile FUSE mapping) ends the early read; the rest is read on from the pipe."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 1000)
    probe = subprocess.Popen([sys.executable, "-IS", "-c", PROBE.format(src=SRC), *_argv(os.getpid())],
                             stdin=read_end, stdout=subprocess.PIPE, text=True, env={"CORE_SECONDS": "0.5"})
    os.close(read_end)
    # Past the early read's bound: it has given up (it polls), and the probe now blocks reading on.
    wait_for(lambda: "pipe_read" in Path(f"/proc/{probe.pid}/wchan").read_text(), 60, "the probe to read on")
    os.write(write_end, b"y" * 500)
    os.close(write_end)
    got = json.loads(probe.communicate(timeout=60)[0])
    assert (got["prefix"], got["rest"], got["eof"], got["released"]) == (1000, 500, False, False)
    assert got["core"] == hashlib.sha256(b"x" * 1000 + b"y" * 500).hexdigest()


def test_gone_process_still_reads_the_core(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    (tmp_path / "core").write_bytes(b"core")
    with open(tmp_path / "core", "rb") as stdin:
        got = _take(_argv(child.pid), stdin)
    assert got["opened"] is False and got["files"] == [] and got["held"] == []
    assert got["eof"] and got["released"] and got["prefix"] == 4


@pytest.mark.parametrize("argv", [["garbage"], []])
def test_no_pid_reads_no_proc(tmp_path: Path, argv: list) -> None:
    (tmp_path / "core").write_bytes(b"core")
    with open(tmp_path / "core", "rb") as stdin:
        got = _take(argv, stdin)
    assert got["opened"] is None and got["eof"] and got["prefix"] == 4


def test_held_files_need_root_for_map_files() -> None:
    need(os.geteuid() == 0, "needs root to open /proc/<pid>/map_files")
    entries: list = []
    errors: list = []
    dir_fd = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    try:
        capture.open_mapped(dir_fd, Path("/proc/self/maps").read_text(), os.readlink("/proc/self/exe"), entries,
                            errors, capture.local_devices(b"", True))
    finally:
        os.close(dir_fd)
    try:
        assert entries[0][2] and not any(e[2] for e in entries[1:]) and errors == []
        inodes = [os.fstat(fd).st_ino for _path, fd, _exe in entries]
        assert len(inodes) == len(set(inodes)) > 1
    finally:
        for _path, fd, _exe in entries:
            os.close(fd)


OVERLAY_TABLE = ("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                 "2 1 0:40 / /fuse rw - fuse.blocker blocker rw\n"
                 "3 1 0:41 / /up rw - tmpfs tmpfs rw\n"
                 "4 1 0:42 / /ovl rw - overlay overlay rw,lowerdir=/fuse,upperdir=/up/u,workdir=/up/w\n"
                 "5 1 0:43 / /ok rw - overlay overlay rw,lowerdir=/var/l1:/x,upperdir=/up/u2,workdir=/up/w2\n"
                 "6 1 0:44 / /top rw - overlay overlay rw,lowerdir=/ovl,upperdir=/up/u3,workdir=/up/w3\n"
                 "7 1 0:45 / /rel rw - overlay overlay rw,lowerdir=l/ABC,upperdir=/up/u4,workdir=/up/w4\n")


def test_an_overlay_is_judged_by_its_layers() -> None:
    """Opening an overlay's file opens its layer's: an overlay over FUSE (directly or through another overlay)
    is not local; one whose layers are local, or out of the table's sight (root's own), is as before; an
    unprivileged mounter's overlay never is."""
    table = procfs.mounts(OVERLAY_TABLE)
    by_device = {mount.device: mount for mount in table}
    assert "/fuse is fuse.blocker, not a local filesystem" in capture.judge(by_device["0:42"], table, True)
    assert capture.judge(by_device["0:43"], table, True) is None
    assert "layer /ovl is an overlay whose layer /fuse is fuse.blocker" in capture.judge(by_device["0:44"], table, True)
    assert capture.judge(by_device["0:45"], table, True) is None  # relative: the mounter's cwd, root's own
    assert "another user namespace" in capture.judge(by_device["0:43"], table, False)
    assert capture.judge(by_device["0:41"], table, False) is None
