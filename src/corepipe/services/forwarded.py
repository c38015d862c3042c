"""Crashes a pipe handler handed to ``corepipe serve`` (platform/forward.py): the worker's side, and the journal
that keeps a crash recorded when the server dies holding it.

A worker collects a handed-over crash with ``collect.run``, the pipe handler's own pipeline: the kernel's pipe
becomes its stdin, the pidfd the one named in the arguments, and the crashed process is still held by the
kernel (it waits until every reader of the pipe has closed it), so /proc, the container and the core are read
exactly as the handler would have read them. Only the config is the server's (loaded once per change), and a
crash that waited too long for a worker, or came to a saturated server, is recorded without its core.

The journal: the accept loop writes ``<run dir>/forwarded/<pid>`` (the handler's arguments; for a kernel
connection on the coredump socket, what its peer's credentials say) before it takes a crash, and the worker
deletes it as soon as it has the crash (a kernel connection's once the crash has its first record). An entry
whose process is gone was held by a server that died before any worker had it (the kernel ended the dump when
the server's fds closed): the server's guardian, or the next start, files a record for it from the arguments
(``recover``).
"""

from __future__ import annotations

import os
import time
from typing import Optional

from corepipe.platform import capture, forward, memread, procfs
from corepipe.platform.config import Config
from corepipe.platform.fs import unlink_if_present
from corepipe.platform.kernel import UNKNOWN, KernelArgs, parse_args
from corepipe.platform.log import ERR, WARNING, log
from corepipe.services import collect

JOURNAL = "forwarded"
#: How long a journal entry's process may still exist after the server died before it counts as lost (a
#: worker that had taken it holds the process; one that has not yet deleted the entry does so within this).
GRACE = 1.0


def _journal(run_dir: str) -> str:
    return os.path.join(run_dir, JOURNAL)


def note(run_dir: str, got: forward.Forwarded) -> Optional[str]:
    """The journal entry of a handed-over crash about to be taken (its path), or None (logged) when it cannot be
    written."""
    pid, _ = capture.kernel_ids(got.argv)
    return _write(run_dir, pid, got.argv)


def note_peer(run_dir: str, pid: int, uid: int, gid: int) -> Optional[str]:
    """The journal entry of a kernel connection on the coredump socket, from its peer's credentials: what the
    accept loop knows (the worker learns the rest from the pidfd), in the kernel's argument order."""
    try:
        comm = procfs.read(pid, "comm", 64).rstrip(b"\n").decode("utf-8", "surrogateescape")
    except OSError:
        comm = UNKNOWN
    argv = [str(pid), UNKNOWN, UNKNOWN, str(uid), str(gid), UNKNOWN, str(int(time.time())), UNKNOWN, UNKNOWN,
            UNKNOWN, UNKNOWN, comm]
    return _write(run_dir, pid, argv)


def _write(run_dir: str, pid: Optional[int], argv: list) -> Optional[str]:
    if pid is None:
        return None
    path = os.path.join(_journal(run_dir), str(pid))
    try:
        os.makedirs(_journal(run_dir), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, "\0".join(argv).encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"error: serve: cannot journal the crash of pid {pid} (it is not recorded should the server die "
            f"before a worker has it): {exc}", ERR)
        return None
    return path


def handle(got: forward.Forwarded, journal: Optional[str], cfg: Config, problems: list, accepted: float,
           refused: Optional[str], reader: Optional[memread.MemoryReader] = None,
           buffer: Optional[memoryview] = None) -> int:
    """One handed-over crash, in a worker: ``collect.run`` with the pipe as stdin; the exit code of collect."""
    unlink_if_present(journal)
    os.dup2(got.pipe, capture.STDIN, inheritable=False)
    os.close(got.pipe)
    got.pipe = capture.STDIN
    argv = forward.local_argv(got.argv, got.pidfd)
    pid, pidfd = capture.kernel_ids(argv)
    early = capture.take_proc(pid, pidfd, reader)
    early.started = accepted
    early.received = time.time() - (time.monotonic() - accepted)
    if refused is None:
        capture.take_core(early, capture.STDIN, buffer=buffer)
    return collect.run(argv, early, cfg=cfg, problems=tuple(problems), refused=refused, transport="forwarded")


def recover(run_dir: str, cfg: Config, why: str, grace: float = GRACE) -> int:
    """A record for each journal entry whose process is gone (after ``grace`` seconds, for a worker that has it
    but not yet deleted the entry); the number recorded."""
    try:
        names = sorted(os.listdir(_journal(run_dir)))
    except FileNotFoundError:
        return 0
    if names and grace:
        time.sleep(grace)
    recorded = 0
    for name in names:
        path = os.path.join(_journal(run_dir), name)
        if not name.isdigit() or procfs.exists(name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                argv = memread.read_fd(fd, forward.MAX_MESSAGE).decode("utf-8", "surrogateescape").split("\0")
            finally:
                os.close(fd)
        except OSError as exc:
            log(f"error: serve: cannot read the journal entry {path}: {exc}", ERR)
            continue
        refused = f"{why} before a worker took the crash; the kernel ended the dump: no core, nothing read of /proc"
        early = capture.Capture()
        early.eof = early.released = True
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            collect.collect(_without_pidfd(argv), early, core_fd=null, cfg=cfg, refused=refused)
        finally:
            os.close(null)
        unlink_if_present(path)
        recorded += 1
        log(f"serve: pid {name}: {refused}; recorded from its journal entry", WARNING)
    return recorded


def _without_pidfd(argv: list) -> KernelArgs:
    args = parse_args(argv)
    args.pidfd = None  # the number was the dead server's (or handler's)
    return args
