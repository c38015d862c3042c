"""Host-wide counting semaphores made of lock files: how many handlers may do heavy work at once.

In pipe mode the kernel starts one handler per crash, and core_pipe_limit counts a handler only
while it holds the kernel's pipe. So that a crash storm neither loses crashes (a low limit makes the
kernel skip them without a trace) nor runs any number of root compressors, gdbs and copies at once
(everything after the pipe is let go is outside the limit), the handler itself takes a slot:

- a *core* slot to read and compress a core. Never waited for: a handler that finds every core slot
  taken records the crash without a core ("storm: ...") and lets the kernel go at once;
- a *postmortem* slot to save binaries and take a backtrace after the pipe is let go. As many
  handlers again may wait for one, each for at most ``postmortem_wait`` seconds; the rest skip it,
  and the record says why.

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
QUEUE = "postmortem-queue"
#: How often a waiting handler tries the postmortem slots again (a lock file cannot be waited on
#: for "any of N" without polling; ~20 tries a second cost nothing next to a backtrace).
RETRY_SECONDS = 0.05


def count(setting: int) -> int:
    """The number of slots for a ``concurrent_*`` setting: -1 is one per CPU, 0 is no limit."""
    if setting >= 0:
        return setting
    return max(1, len(os.sched_getaffinity(0)))


class Turn:
    """A slot held until ``close``; or, with ``refused``, why none was had. With neither, the work goes on
    unbounded (no limit is set, or the slots could not be used: ``error`` says why)."""

    def __init__(self, fd: Optional[int] = None, refused: Optional[str] = None, error: Optional[str] = None):
        self.fd, self.refused, self.error = fd, refused, error

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
    over the slots); None if every one is taken. Closes nothing."""
    start = os.getpid() % len(fds)
    for fd in fds[start:] + fds[:start]:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        return fd
    return None


def _take(store: Store, kind: str, number: int, seconds: float = 0) -> Optional[int]:
    """A locked file of ``kind`` (the others closed), trying again for up to ``seconds``; None if none was free."""
    fds = _open_files(store, kind, number)
    deadline = time.monotonic() + seconds
    locked = None
    try:
        while True:
            locked = _lock_one(fds)
            if locked is not None or time.monotonic() >= deadline:
                return locked
            time.sleep(RETRY_SECONDS)
    finally:
        for fd in fds:
            if fd != locked:
                os.close(fd)


def _unusable(exc: OSError, what: str) -> Turn:
    message = f"cannot use the {what} slots in {DIRECTORY}: {exc}; going on without the host-wide bound"
    log(f"error: {message}", ERR)
    return Turn(error=message)


def core_turn(store: Store, cfg: Config) -> Turn:
    """A core slot now, or a refusal saying the storm took them all (see the module's text)."""
    number = count(cfg.concurrent_cores)
    if number == 0:
        return Turn()
    try:
        fd = _take(store, CORE, number)
    except OSError as exc:
        return _unusable(exc, CORE)
    if fd is None:
        return Turn(refused=f"storm: {number} handlers busy storing cores (concurrent_cores); recorded without "
                            "a core")
    return Turn(fd)


def postmortem_turn(store: Store, cfg: Config) -> Turn:
    """A postmortem slot, waited for in one of as many queue places for at most ``postmortem_wait`` seconds;
    or a refusal saying why the binaries and backtrace are skipped."""
    number = count(cfg.concurrent_postmortems)
    if number == 0:
        return Turn()
    busy = f"storm: {number} handlers busy saving binaries and backtraces (concurrent_postmortems)"
    try:
        fd = _take(store, POSTMORTEM, number)
        if fd is None:
            place = _take(store, QUEUE, number)
            if place is None:
                return Turn(refused=f"{busy} and {number} waiting; skipped")
            try:
                fd = _take(store, POSTMORTEM, number, cfg.postmortem_wait)
            finally:
                os.close(place)
    except OSError as exc:
        return _unusable(exc, POSTMORTEM)
    if fd is None:
        return Turn(refused=f"{busy}; waited {cfg.postmortem_wait} s, skipped")
    return Turn(fd)
