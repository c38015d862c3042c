"""What /proc says about the crashed process, read while the kernel still holds it.

The directory ``/proc/<pid>`` is opened once and every file is read relative to it,
so a PID recycled half-way cannot mix two processes. Each read is bounded and a
vanished process is normal: whatever was read is kept, the rest is listed in ``errors``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

_TEXT_FILES = ("comm", "cmdline", "status", "limits", "cgroup", "maps", "mountinfo", "environ", "stat")


@dataclass
class Snapshot:
    pid: int
    files: dict[str, bytes] = field(default_factory=dict)
    exe: Optional[str] = None
    cwd: Optional[str] = None
    root: Optional[str] = None
    start_ticks: Optional[int] = None
    errors: list[str] = field(default_factory=list)
    #: Reasons not to attribute this data to the crash (PID reuse, uid mismatch, ...). Empty means trusted.
    untrusted: list[str] = field(default_factory=list)
    #: An fd on the /proc/<pid> directory, kept so later stages can open more of it; closed by close().
    dir_fd: Optional[int] = None

    @property
    def trusted(self) -> bool:
        return not self.untrusted

    def text(self, name: str) -> str:
        return self.files.get(name, b"").decode("utf-8", "replace")

    def status(self) -> dict[str, str]:
        result = {}
        for line in self.text("status").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                result[key] = value.strip()
        return result

    def cmdline(self) -> list[str]:
        raw = self.files.get("cmdline", b"")
        return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []

    def environ(self) -> list[str]:
        raw = self.files.get("environ", b"")
        return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []

    def close(self) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


def read_fd(fd: int, limit: int, check: Optional[Callable[[], None]] = None) -> bytes:
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


def _read(dir_fd: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def parse_start_ticks(stat: bytes) -> Optional[int]:
    """Field 22 of /proc/<pid>/stat; the comm in field 2 may hold spaces and ')' so split after the last ')'."""
    _, sep, rest = stat.rpartition(b")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def pidfd_pid(pidfd: int) -> Optional[int]:
    """The PID a pidfd refers to, from its fdinfo: -1 once the process is gone, None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f.read(4096).splitlines():
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def take(pid: int, *, ns_pid: Optional[int] = None, uid: Optional[int] = None, gid: Optional[int] = None,
         pidfd: Optional[int] = None, limit: int = 1 << 20) -> Snapshot:
    snap = Snapshot(pid=pid)
    if pidfd is not None:
        owner = pidfd_pid(pidfd)
        if owner is None:
            snap.errors.append(f"fd {pidfd} is not a pidfd")
            pidfd = None
        elif owner != pid:
            snap.untrusted.append(f"the kernel's pidfd refers to pid {owner}, not {pid}")
    try:
        snap.dir_fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        snap.errors.append(f"/proc/{pid}: {exc.strerror}")
        snap.untrusted.append("process gone before it could be read")
        return snap
    for name in _TEXT_FILES:
        try:
            snap.files[name] = _read(snap.dir_fd, name, limit)
        except OSError as exc:
            snap.errors.append(f"{name}: {exc.strerror}")
    for name in ("exe", "cwd", "root"):
        try:
            setattr(snap, name, os.readlink(name, dir_fd=snap.dir_fd))
        except OSError as exc:
            snap.errors.append(f"{name}: {exc.strerror}")
    snap.start_ticks = parse_start_ticks(snap.files.get("stat", b""))
    _verify(snap, ns_pid=ns_pid, uid=uid, gid=gid, pidfd=pidfd)
    return snap


def _verify(snap: Snapshot, *, ns_pid: Optional[int], uid: Optional[int], gid: Optional[int],
            pidfd: Optional[int]) -> None:
    """After reading: is this still the process the kernel is dumping?"""
    try:
        again = parse_start_ticks(_read(snap.dir_fd, "stat", 4096))
    except OSError:
        again = None
    if snap.start_ticks is not None and again is not None and again != snap.start_ticks:
        snap.untrusted.append("the process's start time changed while it was read (PID reused)")
    if pidfd is not None and pidfd_pid(pidfd) != snap.pid:
        snap.untrusted.append("the kernel's pidfd no longer refers to this PID")
    status = snap.status()
    if not status:
        return
    for key, expected in (("Uid", uid), ("Gid", gid)):
        values = status.get(key, "").split()
        if expected is not None and values and values[0] != str(expected):
            snap.untrusted.append(f"{key} {values[0]} differs from the kernel's {expected}")
    nspids = status.get("NSpid", "").split()
    if ns_pid is not None and nspids:
        if nspids[-1] != str(ns_pid) or nspids[0] != str(snap.pid):
            snap.untrusted.append(f"NSpid {' '.join(nspids)} does not match the kernel's pid {snap.pid}/{ns_pid}")
