"""The coredump socket protocol (include/uapi/linux/coredump.h) over real socketpairs, and what the worker
derives from a pidfd and /proc without the kernel's % arguments."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess

import pytest

from corepipe.platform import coredump_socket as cs
from corepipe.platform import elf
from corepipe.services.serve import server, worker


def _pair() -> tuple:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_struct_layouts_match_the_uapi_header() -> None:
    assert cs.pack_ack(cs.KERNEL | cs.WAIT) == struct.pack("<IIQ", 16, 0, 9)
    assert cs.parse_request(struct.pack("<IIQ", 16, 16, 15)) == cs.Request(16, 16, 15)
    # PIDFD_GET_INFO is _IOWR(0xFF, 11, struct pidfd_info): direction, size and number as the kernel decodes them.
    assert cs.PIDFD_GET_INFO >> 30 == 3 and (cs.PIDFD_GET_INFO >> 8) & 0xFF == 0xFF and cs.PIDFD_GET_INFO & 0xFF == 11
    assert (cs.PIDFD_GET_INFO >> 16) & 0x3FFF >= 64  # at least PIDFD_INFO_SIZE_VER0


def test_a_bigger_request_is_read_whole_and_its_tail_ignored() -> None:
    kernel, server = _pair()
    with kernel, server:
        kernel.sendall(struct.pack("<IIQ", 32, 24, 15) + b"\xee" * 16 + b"\x7fELF")
        request = cs.read_request(server)
        assert request == cs.Request(32, 24, 15)
        assert server.recv(4) == b"\x7fELF", "the request's tail was consumed, nothing after it"


@pytest.mark.parametrize("size", [8, 15, cs.REQ_SIZE_MAX + 1])
def test_a_request_of_impossible_size_is_refused(size: int) -> None:
    kernel, server = _pair()
    with kernel, server:
        kernel.sendall(struct.pack("<IIQ", size, 16, 15))
        with pytest.raises(cs.ProtocolError):
            cs.read_request(server)


def test_a_short_request_is_refused() -> None:
    kernel, server = _pair()
    with kernel, server:
        kernel.sendall(struct.pack("<II", 16, 16))
        kernel.shutdown(socket.SHUT_WR)
        with pytest.raises(cs.ProtocolError, match="ended after"):
            cs.read_request(server)


def test_choose_only_offered_bits_and_wait_only_with_kernel() -> None:
    offered = cs.Request(16, 16, cs.KERNEL | cs.REJECT | cs.WAIT)
    assert cs.choose(offered, cs.KERNEL) == cs.KERNEL | cs.WAIT
    assert cs.choose(offered, cs.REJECT) == cs.REJECT
    assert cs.choose(cs.Request(16, 16, cs.KERNEL | cs.REJECT), cs.KERNEL) == cs.KERNEL
    with pytest.raises(cs.ProtocolError):
        cs.choose(cs.Request(16, 16, cs.KERNEL), cs.REJECT)


@pytest.mark.parametrize("mark, ok", [(0, True), (1, False), (2, False), (3, False), (4, False)])
def test_send_ack_reads_the_four_byte_marker(mark: int, ok: bool) -> None:
    kernel, server = _pair()
    with kernel, server:
        kernel.sendall(struct.pack("<I", mark))
        if ok:
            cs.send_ack(server, cs.KERNEL | cs.WAIT)
        else:
            with pytest.raises(cs.ProtocolError, match=cs.MARKS[mark]):
                cs.send_ack(server, cs.KERNEL | cs.WAIT)
        assert kernel.recv(64) == cs.pack_ack(cs.KERNEL | cs.WAIT)


def test_peer_pidfd_and_info_of_a_process_that_is_not_dumping() -> None:
    """A local process that connects is told apart from the kernel: it is not dumping core."""
    kernel, server = _pair()
    with kernel, server:
        pidfd = cs.peer_pidfd(server)
        try:
            info = cs.pidfd_info(pidfd)
        finally:
            os.close(pidfd)
    assert info.pid == info.tgid == os.getpid() and info.ruid == os.getuid() and info.rgid == os.getgid()
    assert info.mask & cs.PIDFD_INFO_CREDS and not info.dumping


def test_pidfd_exit_gives_the_wait_status() -> None:
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert cs.pidfd_exit(pidfd) is None
        child.kill()
        child.wait()
        status = cs.pidfd_exit(pidfd)
    finally:
        os.close(pidfd)
    assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_parse_pidfd_info_of_a_shorter_answer() -> None:
    """An older kernel fills only the first 64 bytes: no coredump fields, not dumping."""
    data = struct.pack("<QQ12I", cs.PIDFD_INFO_PID | cs.PIDFD_INFO_CREDS, 7, 10, 10, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    info = cs.parse_pidfd_info(data)
    assert (info.pid, info.cgroupid, info.coredump_mask, info.signal) == (10, 7, 0, None) and not info.dumping


def test_pattern() -> None:
    assert cs.pattern("/run/corepipe/coredump.socket") == "@@/run/corepipe/coredump.socket"
    assert cs.pattern("/run/x.sock", ack=False) == "@/run/x.sock"
    for bad in ("run/x.sock", "/run/a b.sock"):
        with pytest.raises(ValueError):
            cs.pattern(bad)


def test_core_modes_of_a_fake_proc_sys(tmp_path) -> None:
    (tmp_path / "kernel").mkdir()
    assert cs.core_modes(str(tmp_path)) == set()
    (tmp_path / "kernel" / "core_modes").write_text("file\npipe\nsocket\n")
    assert cs.core_modes(str(tmp_path)) == {"file", "pipe", "socket"}


def _core_with_prstatus(signo: int) -> bytes:
    """A minimal 64-bit little-endian ELF core: one PT_NOTE holding one NT_PRSTATUS."""
    desc = struct.pack("<iii", signo, 0, 0) + b"\0" * 100
    note = struct.pack("<III", 5, len(desc), 1) + b"CORE\0\0\0\0" + desc
    phoff, phsize = 64, 56
    header = (b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64,
                                                               phsize, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 0, phoff + phsize, 0, 0, len(note), 0, 4)
    return header + phdr + note


def test_signal_from_the_core_notes() -> None:
    core = _core_with_prstatus(signal.SIGABRT)
    assert elf.signal_number(core) == signal.SIGABRT
    assert elf.expected_size(core) == len(core)
    assert elf.signal_number(core[:100]) is None, "notes not in the head"
    assert elf.signal_number(b"not an ELF core" * 10) is None


def test_load_degrades_with_the_queue() -> None:
    loop = server.Server(server.Options(workers=2, queue_limit=10))
    assert loop.load() == worker.NORMAL
    loop.queue.extend([(None, 0.0)] * 4)
    assert loop.load() == worker.FAST
    loop.queue.extend([(None, 0.0)] * 6)
    assert loop.load() == worker.RECORD_ONLY
