"""The collector through the real kernel: a crash piped by core_pattern lands as core + record."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support import CRASH_LINE, Handler, core_digest, crash, decompress, gdb_backtrace, host_dir, need_tool, wait_log


def _check_core(rec: dict, tmp_path: Path, crasher: Path) -> bytes:
    core = rec["core"]
    assert core["stored"] is True and core["file"] == "core.zst"
    data = decompress(Path(rec["_dir"]) / "core.zst", tmp_path / "core")
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[16:18], "little") == 4, "not an ELF core (ET_CORE)"
    assert len(data) == core["size"]
    assert core_digest(data) == core["digest"]
    assert core["compressed_size"] == (Path(rec["_dir"]) / "core.zst").stat().st_size
    assert core["truncated"] is False
    bt = gdb_backtrace(str(crasher), tmp_path / "core")
    assert " main " in bt and f"crasher.c:{CRASH_LINE}" in bt, bt
    return data


def test_host_process(kernel_handler, crasher: Path, tmp_path: Path) -> None:
    proc = crash([str(crasher)])
    assert proc.returncode == -signal.SIGSEGV
    rec = kernel_handler.wait_record(lambda r: r["exe"] == str(crasher))
    pid = rec["pid"]
    assert rec["schema"] == 2 and rec["status"] == "complete"
    assert rec["ns_pid"] == pid and rec["tid"] == pid
    assert rec["signal"] == {"number": signal.SIGSEGV, "name": "SIGSEGV"}
    assert rec["uid"] == os.getuid() and rec["gid"] == os.getgid()
    assert rec["comm"] == "crasher" and rec["cmdline"] == [str(crasher)]
    assert rec["container"]["runtime"] == "host"
    assert rec["process"]["trusted"] is True, rec["process"]["untrusted_reasons"]
    assert rec["core_limit"] == 2**64 - 1
    assert rec["collector"]["errors"] == []
    assert Path(rec["_dir"]).parent == host_dir(kernel_handler.store)
    _check_core(rec, tmp_path, crasher)


def test_own_pid_namespace_uses_host_pid(kernel_handler, crasher: Path, tmp_path: Path) -> None:
    unshare = need_tool("unshare")
    crash([unshare, "--pid", "--fork", "--mount-proc", str(crasher)])
    # unshare re-raises the child's signal on itself: two cores; pick the crasher's (PID 1 in its namespace).
    rec = kernel_handler.wait_record(lambda r: r["exe"] == str(crasher))
    assert rec["ns_pid"] == 1
    assert rec["pid"] != 1 and rec["pid"] > 1
    assert rec["process"]["status"]["NSpid"].split() == [str(rec["pid"]), "1"]
    assert rec["process"]["trusted"] is True, rec["process"]["untrusted_reasons"]
    _check_core(rec, tmp_path, crasher)


def test_core_limit_zero_records_without_core(kernel_handler, crasher: Path) -> None:
    crash([str(crasher), "0", "nocore"], core_limit=0)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "nocore")
    assert rec["core_limit"] == 0
    assert rec["core"]["stored"] is False and rec["core"]["file"] is None
    assert "RLIMIT_CORE" in rec["core"]["reason"]
    assert not (Path(rec["_dir"]) / "core.zst").exists()
    assert rec["status"] == "complete"


def test_small_core_limit_truncates(kernel_handler, crasher: Path, tmp_path: Path) -> None:
    limit = 64 * 1024
    crash([str(crasher), "4", "small"], core_limit=limit)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "small")
    core = rec["core"]
    assert core["stored"] is True and core["truncated"] is True and core["size"] == limit
    data = decompress(Path(rec["_dir"]) / "core.zst", tmp_path / "core")
    assert len(data) == limit and data[:4] == b"\x7fELF"
    assert core_digest(data) == core["digest"]


def test_kernel_log_has_one_line_per_crash(kernel_handler, crasher: Path) -> None:
    crash([str(crasher), "0", "logged"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "logged")
    lines = wait_log(f"id {rec['id']}")  # the handler logs after it writes the final record
    assert len(lines) == 1 and "corepipe" in lines[0] and "(logged)" in lines[0], lines


@contextlib.contextmanager
def _syslog_socket(handler: Handler) -> Iterator[socket.socket]:
    """Our own datagram socket at /dev/log for the duration: bind-mounted over a real one, else created; undone
    by the handler's KernelSettings watchdog should the test process die inside."""
    path = handler.workdir / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    existed = os.path.lexists("/dev/log")
    try:
        if existed:
            handler.settings.undo_on_abort(["umount", "/dev/log"])
            subprocess.run(["mount", "--bind", str(path), "/dev/log"], check=True)
        else:
            handler.settings.undo_on_abort(["rm", "-f", "/dev/log"])
            os.symlink(path, "/dev/log")
        yield sock
    finally:
        if existed:
            subprocess.run(["umount", "/dev/log"], check=False)
        else:
            os.unlink("/dev/log")
        sock.close()


def test_syslog_has_one_line_per_crash(kernel_handler, crasher: Path) -> None:
    with _syslog_socket(kernel_handler) as sock:
        crash([str(crasher), "0", "syslogged"])
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "syslogged")
        sock.settimeout(10)
        messages = []
        while not any(f"id {rec['id']}" in m for m in messages):
            messages.append(sock.recv(65536).decode(errors="replace"))
    [line] = [m for m in messages if f"id {rec['id']}" in m]
    # <priority>: facility daemon (3), and the program name with the handler's PID.
    assert re.match(r"<(\d+)>", line) and int(re.match(r"<(\d+)>", line).group(1)) >> 3 == 3, line
    assert re.search(r"corepipe\[\d+\]: pid \d+ \(syslogged\) signal SIGSEGV", line), line


def test_the_kernels_pidfd_arrives_and_is_checked(kernel_handler, crasher: Path) -> None:
    """%F: on a kernel that has it, the pidfd reaches the handler and names the crashed PID before and after the
    /proc reads (a pattern or parser that lost it would leave "absent" or "not a pidfd"); without it, "absent"."""
    from corepipe.services.install import kernel_has_pidfd

    crash([str(crasher), "0", "pidfd"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "pidfd")
    release = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    if release >= (6, 16):  # %F came with Linux 6.16
        assert kernel_has_pidfd(os.uname().release), "install would leave %F out of the pattern on this kernel"
        assert rec["process"]["pidfd"] == "verified", rec["process"]
    else:
        assert rec["process"]["pidfd"] == "absent", rec["process"]
    assert rec["process"]["trusted"] is True and not any("pidfd" in e for e in rec["process"]["errors"])
