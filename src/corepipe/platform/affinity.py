"""One CPU for the task that writes a core and the thread that reads it (the coredump socket, the pipe).

The kernel sends a core a page at a time. To the coredump socket each page is an skb queued under the
receiving socket's locks, which the reading thread takes for each page it takes off; a pipe has its
mutex. On two CPUs the two sides take those locks in turn for every page, and in a VM a contended
lock is dear: perf showed ``_raw_spin_lock`` in ``unix_stream_sendmsg`` at 18% of the crashed task's
samples. On one CPU they take turns instead: the task fills the buffer, sleeps, the reader drains it.
zstd's workers keep the other CPUs. With 1 GiB crashes here the server's worker used a third less CPU
and the crashed task's system time fell to what it is with the zstd CLI on a pipe; the pipe handler
used an eighth less (README, "One CPU for the core's two ends").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Callable, Optional

from corepipe.platform.capture import pidfd_pid, stat_field


def cpu_of(tid: int) -> Optional[int]:
    """The CPU the thread ``tid`` ran on last (field 39 of its stat), None if it is gone."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            return stat_field(f.read(4096), 39)
    except OSError:
        return None


class SharedCpu:
    """``join`` puts this thread and the dumping thread ``tid`` on one CPU; ``leave`` gives this thread its CPUs
    back. The dumping thread keeps the one CPU: it runs no user code again, and it exits once the core is read.
    Its tid cannot be another task's meanwhile: the kernel holds it until the core's reader lets go, and
    ``alive`` (the pidfd's check) says it has not been killed."""

    def __init__(self, tid: int, alive: Optional[Callable[[], bool]] = None):
        self.tid, self.alive = tid, alive
        self.saved: Optional[set] = None

    def join(self, slot: Optional[int] = None) -> None:
        """On the ``slot``-th of this thread's CPUs (the core slot held, so that streams at the same time each
        have a CPU of their own), else, or where the task's cpuset refuses that one, on the CPU the task is on.
        Best effort: with one CPU, or none that both may use, both go on as they were."""
        try:
            mine = os.sched_getaffinity(0)
            if len(mine) < 2 or (self.alive is not None and not self.alive()):
                return
            for cpu in self._choices(mine, slot):
                if cpu not in mine:
                    continue
                try:
                    os.sched_setaffinity(self.tid, {cpu})
                except OSError:
                    continue  # not in the task's cpuset: the CPU it is on is
                os.sched_setaffinity(0, {cpu})
                self.saved = mine
                return
        except OSError:
            return

    def _choices(self, mine: set, slot: Optional[int]) -> Iterator[Optional[int]]:
        """The slot's CPU, then the task's (read only if the slot's is refused)."""
        if slot is not None:
            yield sorted(mine)[slot % len(mine)]
        yield cpu_of(self.tid)

    def leave(self) -> None:
        if self.saved is not None:
            try:
                os.sched_setaffinity(0, self.saved)
            except OSError:
                pass
            self.saved = None


def for_crash(tid: Optional[int], pid: int, pidfd: Optional[int]) -> Optional[SharedCpu]:
    """The crash's dumping thread (the kernel's %I, else its pid), checked through its pidfd; None without one."""
    if pidfd is None:
        return None
    return SharedCpu(tid or pid, alive=lambda: pidfd_pid(pidfd) == pid)
