"""``corepipe serve``'s watchdog: a worker busy with one crash for longer than the config's ``timeout`` plus
``GRACE`` is killed, a fresh worker takes its place, and the crash still gets a record from its journal entry.

A worker bounds itself with SIGALRM, but an alarm cannot end every wait: an open or read that waits on a FUSE
server (a FUSE layer the capture could not judge), or a kernel call that waits uninterruptibly, holds the worker
until SIGKILL. Without the watchdog a few such crashes would stall every later crash on the node. The killed
worker's crash: its "collecting" record is finished as failed, or, if it had none yet, a record without a core is
filed from the journal entry (services/forwarded.py ``settle``), at once: a worker stuck in an uninterruptible
wait (a FUSE request already read by its server) dies only when that wait ends, and only then does the kernel's
pipe or socket close and the crashed process go (a dup kept here to shut the socket down would also hold every
process the kernel's WAIT ties to it). A worker that dies by itself before its crash's final record is treated
alike.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

from corepipe.platform.log import ERR, log
from corepipe.services import forwarded
from corepipe.services.serve.worker import Prepared

#: Seconds past the config's ``timeout`` before a busy worker is killed: the worker's own alarm goes first, and
#: its final record may still take a moment after it.
GRACE = 10.0


class Watchdog:
    """The busy workers' start times and journal entries; ``overdue`` kills and records, ``ended`` records a
    worker that died by itself."""

    def __init__(self, config: Optional[str], stats: object):
        self.prepared = Prepared(config)
        #: The server's counters: ``workers_killed`` is ours.
        self.stats = stats
        #: pid -> (monotonic time the crash was handed over, journal entry).
        self.busy: dict = {}

    def dispatched(self, pid: int, entry: Optional[str]) -> None:
        self.busy[pid] = (time.monotonic(), entry)

    def overdue(self) -> list:
        """SIGKILL every worker busy past ``timeout`` + GRACE and record its crash now (a worker stuck in an
        uninterruptible wait dies only when the wait ends, but runs no more code); their pids (their slots are
        free again)."""
        cfg, _ = self.prepared.current()
        now = time.monotonic()
        killed = []
        for pid, (since, entry) in list(self.busy.items()):
            if now - since < cfg.timeout + GRACE:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it ended meanwhile: reaped as usual
            del self.busy[pid]
            self.stats.workers_killed += 1
            killed.append(pid)
            log(f"error: serve: worker {pid} was busy with one crash for {now - since:.0f} s (timeout {cfg.timeout} s "
                f"+ {GRACE:g} s): killed, a new worker takes its place", ERR)
            if entry is not None and os.path.exists(entry):
                forwarded.settle(entry, cfg, f"the collector was killed after {now - since:.0f} s (timeout "
                                 f"{cfg.timeout} s + {GRACE:g} s): it was blocked, and what it had not done by then "
                                 "was skipped", failed=True)
        return killed

    def ended(self, pid: int, code: int, usage: object) -> None:
        """A worker was reaped: if it died by itself before its crash's final record, record the crash."""
        busy = self.busy.pop(pid, None)
        if busy is None:
            return  # idle, or killed (its crash recorded then)
        _since, entry = busy
        if entry is None or not os.path.exists(entry):
            return  # its crash has its final record
        cfg, _ = self.prepared.current()
        forwarded.settle(entry, cfg, f"the collector ended with code {code} before the crash's final record; what it "
                         "had not done was skipped", cpu=usage.ru_utime + usage.ru_stime,
                         peak_rss=usage.ru_maxrss * 1024, failed=True)
