"""Host-wide counting semaphores made of lock files: how many handlers may do heavy work at once.

In pipe mode the kernel starts one handler per crash, and core_pipe_limit counts a handler only
while it holds the kernel's pipe. So that a crash storm neither loses crashes (a low limit makes the
kernel skip them without a trace) nor runs any number of root compressors, gdbs and copies at once
(everything after the pipe is let go is outside the limit), the handler itself takes a slot:

- a *core* slot (``concurrent_cores``) to read and compress a core;
- a *postmortem* slot (``concurrent_postmortems``) to save binaries and take a backtrace after the
  pipe is let go.

A handler that finds every slot of its kind taken waits for one, in one of ``WAITING_PER_SLOT``
places per slot, for at most ``core_wait`` / ``postmortem_wait`` seconds; when the places are
taken too, or the wait runs out, it goes on without: the crash is recorded without a core
("storm: ...", and the kernel is let go at once), or without binaries and backtrace, and the
record says why. Waiting for a core keeps the crashed process (the kernel holds it until the
pipe is let go), which is why both the wait and the places are bounded.

A slot is ``flock(LOCK_EX | LOCK_NB)`` on one of N empty files in ``<store>/.slots``. The kernel
drops the lock when the holder's file is closed, however the handler ends (finished, killed,
timed out), so a slot is never leaked and nothing needs cleaning up. Production has one store per
host, so the bound is host-wide; the directory is the store's, root-only and opened without
following links like the rest of it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from typing import Optional

from corepipe.platform.config import Config
from corepipe.platform.log import ERR, log
from corepipe.platform.store import Store, StoreError, open_dir

DIRECTORY = ".slots"
CORE = "core"
POSTMORTEM = "postmortem"
CONFIG_KEYS = {CORE: "concurrent_cores", POSTMORTEM: "concurrent_postmortems"}
#: Handlers that may wait for a slot, per slot; beyond them a handler is refused at once. They bound how
#: many crashed processes (cores) and finished ones (postmortems) wait, and the memory of their handlers.
WAITING_PER_SLOT = 8
#: How often a waiting handler tries the slots again (a lock file cannot be waited on for "any of N"
#: without polling; ~20 tries a second cost nothing next to a compression or a backtrace).
RETRY_SECONDS = 0.05


def count(setting: int) -> int:
    """The number of slots for a ``concurrent_*`` setting: -1 is one per CPU, 0 is no limit."""
    if setting >= 0:
        return setting
    return max(1, len(os.sched_getaffinity(0)))


class Turn:
    """A slot held until ``close``; or, with ``refused``, why none was had. With neither, the work goes on
    unbounded (no limit is set, or the slots could not be used: ``error`` says why)."""

    def __init__(self, fd: Optional[int] = None, index: Optional[int] = None, refused: Optional[str] = None,
                 error: Optional[str] = None):
        #: ``index``: which of the N slots, so that holders at the same time have different numbers (a core
        #: slot's picks the CPU its stream runs on, affinity.py).
        self.fd, self.index, self.refused, self.error = fd, index, refused, error

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_files(store: Store, kind: str, number: int) -> list:
    """The ``number`` lock files of ``kind``, created as needed, refusing anything but a plain file."""
    dir_fd = open_dir(store.fd, DIRECTORY)
    fds: list = []
    try:
        for i in range(number):
            fd = os.open(f"{kind}.{i}", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(errno.EINVAL, f"{store.root}/{DIRECTORY}/{kind}.{i} is not a plain file")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(dir_fd)
    return fds


def _lock_one(fds: list) -> Optional[int]:
    """Lock the first free file of ``fds`` (starting at a pid-chosen one, to spread simultaneous handlers
    over the slots) and return its index; None if every one is taken. Closes nothing."""
    start = os.getpid() % len(fds)
    for index in [*range(start, len(fds)), *range(start)]:
        try:
            fcntl.flock(fds[index], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        return index
    return None


def _take(store: Store, kind: str, number: int, seconds: float = 0) -> Optional[tuple]:
    """(fd, index) of a locked file of ``kind`` (the others closed), trying again for up to ``seconds``; None
    if none was free."""
    fds = _open_files(store, kind, number)
    deadline = time.monotonic() + seconds
    index = None
    try:
        while True:
            index = _lock_one(fds)
            if index is not None:
                return fds[index], index
            if time.monotonic() >= deadline:
                return None
            time.sleep(RETRY_SECONDS)
    finally:
        for i, fd in enumerate(fds):
            if i != index:
                os.close(fd)


def _unusable(exc: OSError, what: str) -> Turn:
    message = f"cannot use the {what} slots in {DIRECTORY}: {exc}; going on without the host-wide bound"
    log(f"error: {message}", ERR)
    return Turn(error=message)


def _turn(store: Store, kind: str, setting: int, wait: int, busy: str) -> Turn:
    """A slot of ``kind`` now or, from one of the waiting places, within ``wait`` seconds; else a refusal."""
    number = count(setting)
    if number == 0:
        return Turn()
    places = number * WAITING_PER_SLOT
    busy = f"storm: {number} handlers busy {busy} ({CONFIG_KEYS[kind]})"
    try:
        taken = _take(store, kind, number)
        if taken is None:
            place = _take(store, f"{kind}-queue", places) if wait > 0 else None
            if place is None:
                return Turn(refused=f"{busy} and {places} waiting" if wait > 0 else busy)
            try:
                taken = _take(store, kind, number, wait)
            finally:
                os.close(place[0])
    except OSError as exc:
        return _unusable(exc, kind)
    if taken is None:
        return Turn(refused=f"{busy}; waited {wait} s")
    return Turn(*taken)


def core_turn(store: Store, cfg: Config) -> Turn:
    """A core slot, or a refusal saying the storm took them all (see the module's text)."""
    return _turn(store, CORE, cfg.concurrent_cores, cfg.core_wait, "storing cores")


def postmortem_turn(store: Store, cfg: Config) -> Turn:
    """A postmortem slot, or a refusal saying why the binaries and backtrace are skipped."""
    return _turn(store, POSTMORTEM, cfg.concurrent_postmortems, cfg.postmortem_wait,
                 "saving binaries and backtraces")
