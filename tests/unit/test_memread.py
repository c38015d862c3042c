"""memread.MemoryReader: the child that reads /proc memory files, forked before the crash it reads for."""

from __future__ import annotations

import os

from support import wait_for

from corepipe.platform import capture, memread


def _fds(pid: int) -> set:
    return set(os.listdir(f"/proc/{pid}/fd"))


def test_reads_a_directory_opened_after_the_fork(tmp_path) -> None:
    reader = memread.MemoryReader()
    (tmp_path / "cmdline").write_bytes(b"a\0b\0")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        files, errors = reader.read(dir_fd, ("cmdline", "environ"), 4096, 5)
    finally:
        os.close(dir_fd)
        reader.close()
    assert files == {"cmdline": b"a\0b\0"}
    assert errors == {"environ": os.strerror(2)}
    assert not os.path.exists(f"/proc/{reader._pid}")  # reaped


def test_keeps_no_fd_of_its_parent(tmp_path) -> None:
    """Not the kernel's pipe (fd 0 of a pipe handler), not a server worker's channel: only its two pipes."""
    held = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    reader = memread.MemoryReader()
    try:
        wait_for(lambda: open(f"/proc/{reader._pid}/wchan").read().endswith("pipe_read"), 10,
                 "the reader to wait for its request")  # after it closed what it inherited
        assert len(_fds(reader._pid)) == 2
    finally:
        reader.close()
        os.close(held)


def test_an_unused_reader_exits_when_closed() -> None:
    before = _fds(os.getpid())
    reader = memread.MemoryReader()
    reader.close()
    assert not os.path.exists(f"/proc/{reader._pid}")
    assert _fds(os.getpid()) == before


def test_a_second_read_forks_another_child(tmp_path) -> None:
    (tmp_path / "environ").write_bytes(b"A=1\0")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    reader = memread.MemoryReader()
    try:
        first = reader.read(dir_fd, ("environ",), 4096, 5)
        second = reader.read(dir_fd, ("environ",), 4096, 5)
    finally:
        reader.close()
        os.close(dir_fd)
    assert first == second == ({"environ": b"A=1\0"}, {})


def test_reads_the_crashed_process_proc_files() -> None:
    """Through take_proc, as a server's worker does: the same files as the fork-per-read path."""
    reader = memread.MemoryReader()
    with_reader = capture.take_proc(os.getpid(), None, reader)
    reader.close()
    without = capture.take_proc(os.getpid(), None)
    for cap in (with_reader, without):
        assert cap.proc.files["cmdline"] and cap.proc.files["environ"] is not None
    assert with_reader.proc.files["cmdline"] == without.proc.files["cmdline"]
    assert not [e for e in with_reader.proc.errors if e.startswith(("cmdline", "environ"))]
