"""Reading a runtime's on-disk state: bounded, never following a final symlink, paths from validated parts only.

Runtimes keep their state in root-owned directories (/run, /var/lib); the parts that come
from the crashed process (its container id or name) are checked against strict patterns
before they become a path component, so raw cgroup text never reaches the filesystem.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from typing import Optional

from corepipe.platform.memread import read_fd, read_in_child

#: A 64-hex container id (Docker, containerd CRI, CRI-O, Podman).
HEX_ID = re.compile(r"[0-9a-f]{64}")
#: A runtime-chosen name or id (runc, ctr, LXC, machine names): no '/', no leading '.', bounded.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
JSON_LIMIT = 16 << 20


class Deadline:
    """The time enrichment may still spend; checked before every read."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError("time budget for reading runtime state used up")

    def left(self) -> float:
        """Seconds left (at least a millisecond: a socket timeout of 0 would mean non-blocking)."""
        return max(self.end - time.monotonic(), 0.001)


def path(root: str, *parts: str) -> str:
    """``root`` joined with fixed or validated parts; refuses anything that could climb or jump."""
    for part in parts:
        if any(piece in ("", ".", "..") for piece in part.split("/")):
            raise ValueError(f"unsafe path component {part!r}")
    return os.path.join(root, *parts)


def exists(file: str) -> bool:
    try:
        os.lstat(file)
    except OSError:
        return False
    return True


def read(file: str, deadline: Deadline, limit: int = JSON_LIMIT) -> bytes:
    """A regular file's first ``limit`` bytes; a symlink as last component, a FIFO or a device is refused."""
    deadline.check()
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{file} is not a regular file")
        return read_fd(fd, limit, deadline.check)
    finally:
        os.close(fd)


def read_proc_memory(root: str, pid: int, name: str, deadline: Deadline, limit: int) -> bytes:
    """A /proc/<pid> file the kernel reads from the process's memory (cmdline, environ), read in a child that
    is killed at the deadline: that memory may be a FUSE-backed mapping whose server never answers."""
    deadline.check()
    dir_fd = os.open(path(root, "proc", str(pid)), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        files, errors = read_in_child(dir_fd, (name,), limit, deadline.left())
    finally:
        os.close(dir_fd)
    if name not in files:
        raise OSError(f"/proc/{pid}/{name}: {errors.get(name)}")
    return files[name]


def read_json(file: str, deadline: Deadline, limit: int = JSON_LIMIT):
    return json.loads(read(file, deadline, limit))


def text(value: object) -> Optional[str]:
    """A JSON value as a non-empty str, else None (state files are data, not trusted to be well-formed)."""
    return value if isinstance(value, str) and value else None


def read_pid(file: str, deadline: Deadline) -> Optional[int]:
    """A PID file's number (conmon's pidfile, conmon.pid), or None when it holds none."""
    data = read(file, deadline, 64).strip()
    return int(data) if data.isdigit() and 0 < int(data) < 1 << 22 else None


def positive_int(value: object) -> Optional[int]:
    """A JSON value as a PID (bool is not one), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 22 else None
