"""The task that writes a core and the thread that reads it (the coredump socket, the pipe): on one CPU, or apart.

The kernel sends a core a page at a time. To the coredump socket each page is an skb queued under the
receiving socket's locks, which the reading thread takes for each page it takes off; a pipe has its
mutex. On two CPUs the two sides take those locks in turn for every page, and in a VM a contended
lock is dear: perf showed ``_raw_spin_lock`` in ``unix_stream_sendmsg`` at 18% of the crashed task's
samples. On one CPU they take turns instead: the task fills the buffer, sleeps, the reader drains it.
zstd's workers keep the other CPUs. With 1 GiB crashes here the server's worker used a third less CPU
and the crashed task's system time fell to what it is with the zstd CLI on a pipe; the pipe handler
used an eighth less (README, "One CPU for the core's two ends").

That was on Intel Xeon VMs of this machine class. On its AMD EPYC VMs the same move made 1 GiB crashes a
half slower (the socket 0.99 s together against 0.67 s apart, the pipe 0.76 s against 0.54 s): there the
lock is cheap and the two ends gain more from running at once. ``Placement`` therefore measures both on the
core itself, in turns, and keeps the faster (README, "Together or apart, measured on each core").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Callable, Optional

from corepipe.platform.procfs import cpu_of, pidfd_pid


class SharedCpu:
    """``join`` puts this thread and the dumping thread ``tid`` on one CPU; ``leave`` gives this thread its CPUs
    back. The dumping thread keeps the one CPU: it runs no user code again, and it exits once the core is read.
    Its tid cannot be another task's meanwhile: the kernel holds it until the core's reader lets go, and
    ``alive`` (the pidfd's check) says it has not been killed."""

    def __init__(self, tid: int, alive: Optional[Callable[[], bool]] = None):
        self.tid, self.alive = tid, alive
        self.saved: Optional[set] = None  # this thread's CPUs, while joined
        self.theirs: Optional[set] = None  # the dumping thread's, while joined

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
                    theirs = os.sched_getaffinity(self.tid)
                    os.sched_setaffinity(self.tid, {cpu})
                except OSError:
                    continue  # not in the task's cpuset: the CPU it is on is
                os.sched_setaffinity(0, {cpu})
                self.saved, self.theirs = mine, theirs
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

    def part(self) -> None:
        """Both threads back on the CPUs they had before ``join``."""
        if self.theirs is not None:
            try:
                os.sched_setaffinity(self.tid, self.theirs)
            except OSError:
                pass
            self.theirs = None
        self.leave()

    @property
    def joined(self) -> bool:
        return self.saved is not None


#: A probe: a turn of PROBE bytes each way, one after the other, so that both read much the same part of the core.
PROBE = 8 << 20
#: Bytes read the faster way between probes: SPELL after a change of way, twice the last after a probe that
#: confirms it, LONGEST_SPELL at most.
SPELL = 32 << 20
LONGEST_SPELL = 256 << 20
#: How much faster the other way must read in a probe to be taken.
MARGIN = 1.05


class Placement:
    """``compress_stream``'s ``streaming`` callback: reads the core with the two ends apart or together,
    whichever a probe found faster, and probes again between spells.

    The reads are the pipeline's pace: zstd's workers hold the reader back when they fall behind, the kernel
    when it does. Which way wins depends on the host and on what part of the core is read (on random pages
    zstd is the bottleneck either way; on zeros and text the kernel and the reader are): a probe reads
    PROBE bytes one way and PROBE the other, back to back, its two turns in alternating order."""

    def __init__(self, shared: SharedCpu, slot: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.shared, self.slot, self.clock = shared, slot, clock
        self.together = False  # the faster way so far
        self.spell = SPELL
        self.turn = 0  # 0: a spell (or the start), 1 and 2: a probe's first and second turn
        self.first = True  # the way the last probe's first turn took (so the first probe starts apart)
        self.first_rate = 0.0  # bytes a second of the current probe's first turn
        self.end = 0  # bytes read when the current turn or spell ends
        self.mark = (0, 0.0)  # (bytes read, time) when it began
        self.done = False

    def __call__(self, size: int) -> None:
        if self.done or size < self.end:
            return
        rate = (size - self.mark[0]) / max(self.clock() - self.mark[1], 1e-9)
        if self.turn == 0:
            self.turn, self.first = 1, not self.first
            self._start(size, self.first, PROBE)
        elif self.turn == 1:
            self.turn, self.first_rate = 2, rate
            self._start(size, not self.first, PROBE)
        else:
            rates = {self.first: self.first_rate, not self.first: rate}
            if rates[not self.together] > rates[self.together] * MARGIN:
                self.together, self.spell = not self.together, SPELL
            else:
                self.spell = min(2 * self.spell, LONGEST_SPELL)
            self.turn = 0
            self._start(size, self.together, self.spell)

    def _start(self, size: int, together: bool, length: int) -> None:
        if together and not self.shared.joined:
            self.shared.join(self.slot)
            if not self.shared.joined:
                self.done = True  # the threads cannot share a CPU: nothing to choose
                return
        elif not together and self.shared.joined:
            self.shared.part()
        self.end, self.mark = size + length, (size, self.clock())


def for_crash(tid: Optional[int], pid: int, pidfd: Optional[int]) -> Optional[SharedCpu]:
    """The crash's dumping thread (the kernel's %I, else its pid), checked through its pidfd; None without one."""
    if pidfd is None:
        return None
    return SharedCpu(tid or pid, alive=lambda: pidfd_pid(pidfd) == pid)
