"""What /proc says about the crashed process, read while the kernel still holds it, and whether to trust it.

The reads are procfs.py's (the handler has them done before anything else is imported): the
directory ``/proc/<pid>`` is opened once and every file is read relative to it, so a PID
recycled half-way cannot mix two processes. Each read is bounded and a vanished process is
normal: whatever was read is kept, the rest is listed in ``errors``. The checks run here, on
the bytes read then.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from corepipe.platform import capture, procfs

#: Seconds a process may seem to have started after the dump time: ``%t`` is whole seconds, and the start
#: time is converted from clock ticks since boot.
START_SLACK = 2


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
    #: What became of the kernel's pidfd (%F): "verified" (it named this PID before and after the reads),
    #: "absent" (none given), "not a pidfd", "mismatch"; a record says so, so a broken %F shows.
    pidfd: str = "absent"
    #: ``status`` parsed (procfs.status_fields), once: the checks, the container, the policy and the record use it.
    _status: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def trusted(self) -> bool:
        return not self.untrusted

    def text(self, name: str) -> str:
        return self.files.get(name, b"").decode("utf-8", "replace")

    def status(self) -> dict[str, str]:
        if self._status is None:
            self._status = procfs.status_fields(self.files.get("status", b""))
        return self._status

    def cmdline(self) -> list[str]:
        return procfs.nul_list(self.files.get("cmdline", b""))

    def environ(self) -> list[str]:
        return procfs.nul_list(self.files.get("environ", b""))


def started_at(ticks: int) -> float:
    """The wall-clock time (epoch seconds) of a start time in clock ticks since boot (suspend included)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")


def take(pid: int, *, ns_pid: Optional[int] = None, uid: Optional[int] = None, gid: Optional[int] = None,
         pidfd: Optional[int] = None, limit: int = 1 << 20, dump_time: Optional[int] = None) -> Snapshot:
    """Read /proc/<pid> now; the handler reads it earlier, see capture.py."""
    proc = procfs.Proc(pid, pidfd)
    procfs.read_proc(proc, limit)
    return checked(proc, ns_pid=ns_pid, uid=uid, gid=gid, limit=limit, dump_time=dump_time)


def checked(proc: procfs.Proc, *, ns_pid: Optional[int] = None, uid: Optional[int] = None,
            gid: Optional[int] = None, limit: int = 1 << 20, dump_time: Optional[int] = None) -> Snapshot:
    """The snapshot of what was read into ``proc``, with each file cut at ``limit`` bytes and the trust checks
    (the kernel's pidfd, PID reuse, uid, gid, NSpid) applied. ``dump_time``: the kernel's ``%t``; without a
    pidfd (kernels before 6.16 have no ``%F``) a process that started after it is not the crashed one."""
    snap = Snapshot(pid=proc.pid)
    pidfd = proc.pidfd
    if pidfd is not None:
        if proc.owner is None:
            snap.errors.append(f"fd {pidfd} is not a pidfd")
            snap.pidfd = "not a pidfd"
            pidfd = None
        elif proc.owner != proc.pid:
            snap.untrusted.append(f"the kernel's pidfd refers to pid {proc.owner}, not {proc.pid}")
            snap.pidfd = "mismatch"
    snap.errors += proc.errors
    if not proc.opened:
        snap.untrusted.append("process gone before it could be read")
        return snap
    if proc.timed_out:
        snap.untrusted.append(f"reading /proc/{proc.pid} did not finish within {capture.PROC_SECONDS} s")
    snap.files = {name: data[:limit] for name, data in proc.files.items()}
    if len(proc.files.get("status", b"")) <= limit:
        snap._status = proc.status()  # the crash's one parse (serve's kernel_args may have made it already)
    snap.exe, snap.cwd, snap.root = (proc.links.get(name) for name in procfs.PROC_LINKS)
    snap.start_ticks = procfs.start_ticks(proc.files.get("stat", b""))
    _verify(snap, proc, ns_pid=ns_pid, uid=uid, gid=gid, pidfd=pidfd, dump_time=dump_time)
    return snap


def _verify(snap: Snapshot, proc: procfs.Proc, *, ns_pid: Optional[int], uid: Optional[int],
            gid: Optional[int], pidfd: Optional[int], dump_time: Optional[int]) -> None:
    """After reading: was it still the process the kernel is dumping?"""
    again = procfs.start_ticks(proc.stat_again) if proc.stat_again is not None else None
    if snap.start_ticks is not None and again is not None and again != snap.start_ticks:
        snap.untrusted.append("the process's start time changed while it was read (PID reused)")
    if pidfd is None and dump_time is not None and snap.start_ticks is not None:
        late = started_at(snap.start_ticks) - dump_time
        if late > START_SLACK:
            snap.untrusted.append(f"the process started {late:.0f} s after the dump time (%t): PID reused")
    if pidfd is not None and proc.owner_after != snap.pid:
        snap.untrusted.append("the kernel's pidfd no longer refers to this PID")
        snap.pidfd = "mismatch"
    elif pidfd is not None and proc.owner == snap.pid:
        snap.pidfd = "verified"
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
