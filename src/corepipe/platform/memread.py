"""Reading files whose read can block where no signal but SIGKILL ends the wait (the /proc files the kernel
reads out of a crashed process's memory, which may be a FUSE-backed mapping): in a forked child killed at a
deadline and never waited for. And the bounded reads of an fd that procfs.py and the rest build on.

Imported before the kernel lets the crashed process go (through procfs.py): only ``os`` (``select`` and
``time`` when a child reads), as in capture.py.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

MEMORY_SECONDS = 5


def read_fd(fd: int, limit: int, check: Callable[[], None] | None = None) -> bytes:
    """At most ``limit`` bytes from ``fd``; ``check`` runs before each read (a deadline may raise)."""
    chunks, size = [], 0
    while size < limit:
        if check is not None:
            check()
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_at(dir_fd: int, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the file ``name`` below ``dir_fd``, not following a final symlink."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def read_in_child(dir_fd: int, names: tuple, limit: int, seconds: float) -> tuple:
    """({name: bytes}, {name: error}) of files below ``dir_fd``, read by a forked child that is SIGKILLed after
    ``seconds``: a read that blocks where no signal but SIGKILL ends the wait (a FUSE page) cannot hold the
    handler. A file not read in time has the error "timed out"."""
    reader = MemoryReader()
    try:
        return reader.read(dir_fd, names, limit, seconds)
    finally:
        reader.close()


class MemoryReader:
    """The child of ``read_in_child``, forked when this is made: a socket server's idle worker makes one ahead
    of its crash, so the fork (~1.7 ms here) is not between the kernel's connection and its ack.

    It is told the directory as an fd number of its parent and opens it through ``/proc/<parent>/fd``: the
    same directory, with no fd passing (which would need ``socket``). It keeps no other fd of its parent's
    (not the kernel's pipe either), and exits without reading if the parent closes its request pipe. It
    closes its output before it exits, so the read ends without waiting for its exit (unmapping its copy of
    the parent's memory took ~1 ms of the 1.4): ``close`` reaps it, after the crash's urgent part."""

    def __init__(self) -> None:
        request_read, self._request = os.pipe()
        self._output, output_write = os.pipe()
        parent = os.getpid()
        self._pid = os.fork()
        if self._pid == 0:
            code = 0
            try:
                low, high = sorted((request_read, output_write))
                os.closerange(0, low)
                os.closerange(low + 1, high)
                os.closerange(high + 1, 1 << 20)
                _serve_request(parent, request_read, output_write)
            except BaseException:  # noqa: BLE001 - a child must never return into the handler
                code = 1
            finally:
                os._exit(code)
        os.close(request_read)
        os.close(output_write)
        self._used = self._waited = False

    def read(self, dir_fd: int, names: tuple, limit: int, seconds: float) -> tuple:
        """``read_in_child``'s result; a reader reads once (a second read forks a new one)."""
        if self._used:
            return read_in_child(dir_fd, names, limit, seconds)
        self._used = True  # from here on the request and output fds are closed whatever happens
        import select
        import time

        chunks, deadline, done = [], time.monotonic() + seconds, False
        try:
            try:
                os.write(self._request, b"%d %d %s\n" % (dir_fd, limit, " ".join(names).encode()))
            finally:
                os.close(self._request)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._output], [], [], left)[0]:
                    break
                chunk = os.read(self._output, 1 << 20)
                if not chunk:
                    done = True  # the child closed its end: it is exiting
                    break
                chunks.append(chunk)
        finally:
            os.close(self._output)
            if not done:
                # SIGKILL ends a wait that SIGALRM cannot; but a FUSE request the server has already taken is
                # waited out even then, so the child is not waited for: init reaps it when the server answers.
                os.kill(self._pid, 9)
                os.waitpid(self._pid, os.WNOHANG)
                self._waited = True
        return _parse_child_output(b"".join(chunks), names)

    def close(self) -> None:
        """Reap the child; an unused one is let go first (it sees its request pipe closed and exits)."""
        if not self._used:
            self._used = True
            os.close(self._request)
            os.close(self._output)
        if not self._waited:
            self._waited = True
            os.waitpid(self._pid, 0)


def _serve_request(parent: int, request: int, output: int) -> None:
    """The reader child's work: "<fd> <limit> <names>" in, "<name> <length or -errno>\n<bytes>" out for each."""
    line = read_fd(request, 4096)
    if not line:
        return
    fd, limit, *names = line.split()
    dir_fd = os.open(f"/proc/{parent}/fd/{int(fd)}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in names:
        try:
            data, head = b"", b""
            data = read_at(dir_fd, name.decode(), int(limit))
            head = b"%s %d\n" % (name, len(data))
        except OSError as exc:
            head = b"%s -%d\n" % (name, exc.errno or 0)
        view = memoryview(head + data)
        while view:
            view = view[os.write(output, view):]
    os.close(output)


def _parse_child_output(data: bytes, names: tuple) -> tuple:
    files, errors = {}, {}
    pos = 0
    while pos < len(data):
        line_end = data.find(b"\n", pos)
        if line_end < 0:
            break
        name, _, size = data[pos:line_end].decode("ascii", "replace").partition(" ")
        pos = line_end + 1
        if size.startswith("-"):
            errors[name] = os.strerror(int(size[1:] or 0))
            continue
        if pos + int(size) > len(data):
            break
        files[name] = data[pos:pos + int(size)]
        pos += int(size)
    for name in names:
        if name not in files and name not in errors:
            errors[name] = f"timed out (more than {MEMORY_SECONDS} s: a blocking filesystem?)"
    return files, errors
