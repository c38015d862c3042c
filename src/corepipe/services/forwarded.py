"""Crashes a pipe handler handed to ``corepipe serve`` (platform/forward.py): the worker's side, and the journal
that keeps a crash recorded when the server dies holding it.

A worker collects a handed-over crash with ``collect.run``, the pipe handler's own pipeline: the kernel's pipe
becomes its stdin, the pidfd the one named in the arguments, and the crashed process is still held by the
kernel (it waits until every reader of the pipe has closed it), so /proc, the container and the core are read
exactly as the handler would have read them. Only the config is the server's (loaded once per change), and a
crash that waited too long for a worker, or came to a saturated server, is recorded without its core.

The journal: the accept loop writes ``<run dir>/forwarded/<pid>`` (the handler's arguments; for a kernel
connection on the coredump socket, what its peer's credentials say) before it takes a crash; once the crash has
its first ("collecting") record the worker names that record beside the entry (platform/journal.py), and the
entry goes with the final record. An entry whose process is gone, and whose worker is gone too, belongs to a
server or a worker that died first (the kernel ended the dump when their fds closed): the server's guardian, or
the next start, files a record for it from the arguments, or finishes the record it names as failed
(``recover``); serve's watchdog does the same for a worker it killed (services/serve/watchdog.py, ``settle``).
"""

from __future__ import annotations

import os
import time
from typing import Optional

from corepipe.domain import catalog, record
from corepipe.domain.context import Context
from corepipe.platform import capture, forward, journal, memread, procfs
from corepipe.platform.config import Config
from corepipe.platform.kernel import UNKNOWN, KernelArgs, parse_args
from corepipe.platform.log import ERR, WARNING, log
from corepipe.platform.store import CrashDir, Store, crash_id
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
        journal.write(path, "\0".join(argv))
    except OSError as exc:
        log(f"error: serve: cannot journal the crash of pid {pid} (it is not recorded should the server die "
            f"before a worker has it): {exc}", ERR)
        return None
    return path


def handle(got: forward.Forwarded, journal: Optional[str], cfg: Config, problems: list, accepted: float,
           refused: Optional[str], reader: Optional[memread.MemoryReader] = None,
           buffer: Optional[memoryview] = None) -> int:
    """One handed-over crash, in a worker: ``collect.run`` with the pipe as stdin; the exit code of collect."""
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
    return collect.run(argv, early, cfg=cfg, problems=tuple(problems), refused=refused, transport="forwarded",
                       entry=journal)


def recover(run_dir: str, cfg: Config, why: str, grace: float = GRACE) -> int:
    """A record for each journal entry whose process is gone and whose worker (if it named a record) too
    (after ``grace`` seconds, for a worker that has it but not yet named its record); the number recorded."""
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
        named = journal.record_of(path)
        if named is not None and procfs.exists(str(named[0])):
            continue  # its worker still finishes the record
        if settle(path, cfg, f"{why} before a worker took the crash; the kernel ended the dump: no core, nothing "
                             "read of /proc" if named is None else f"{why} before the crash's record was final"):
            recorded += 1
    return recorded


def settle(path: str, cfg: Config, why: str, cpu: float = 0.0, peak_rss: int = 0, failed: bool = False) -> bool:
    """The crash of journal entry ``path``, whose worker is gone: the "collecting" record it named finished as
    failed with ``why`` (no core is added: a core the worker had not committed stays a hidden temporary), or
    else a record without a core from the entry's arguments (``failed``: with ``why`` as its error); the entry
    goes. ``cpu``, ``peak_rss``: the dead worker's figures (wait4). Whether it was recorded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            argv = memread.read_fd(fd, forward.MAX_MESSAGE).decode("utf-8", "surrogateescape").split("\0")
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"error: serve: cannot read the journal entry {path}: {exc}", ERR)
        return False
    name = os.path.basename(path)
    named = journal.record_of(path)
    if named is not None and _finish(named[1], argv, cfg, why, cpu, peak_rss, path):
        log(f"serve: pid {name}: {why}; its record {named[1]} finished as failed", WARNING)
        return True
    early = capture.Capture()
    early.eof = early.released = True
    if failed:
        early.errors.append(why)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        collect.collect(_without_pidfd(argv), early, core_fd=null, cfg=cfg, refused=why)
    finally:
        os.close(null)
    journal.done(path)
    log(f"serve: pid {name}: {why}; recorded from its journal entry", WARNING)
    return True


def _finish(crash_path: str, argv: list, cfg: Config, why: str, cpu: float, peak_rss: int, entry: str) -> bool:
    """Finish the record at ``crash_path`` (below the store, opened without following links) as failed; False
    when it cannot be read (the crash is then recorded from its entry)."""
    root = cfg.store.rstrip("/")
    if not crash_path.startswith(root + "/"):
        return False
    try:
        with Store(root, create=False) as store:
            fd = store.open_path(crash_path[len(root) + 1:].split("/"))
            crash = CrashDir(fd, crash_path, crash_id(os.path.basename(crash_path)) or "")
            try:
                rec = catalog.read_record(fd)
                if rec.get("status") != "collecting":
                    journal.done(entry)  # the worker finished it before it died
                    return True
                ctx = Context(args=_without_pidfd(argv), early=capture.Capture(), cfg=cfg, store=store, crash=crash,
                              record=rec, journal=entry)
                if rec["core"]["stored"] or rec["core"].get("reason"):
                    record.add_error(rec, why)
                else:  # a core being written stays a hidden temporary: nothing looks complete
                    record.core_not_saved(rec, why)
                record.finish(rec, failed=True, duration=time.time() - rec.get("received", time.time()), cpu=cpu,
                              peak_rss=peak_rss)
                collect.write_final(ctx)
            finally:
                crash.close()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log(f"error: serve: cannot finish the record {crash_path}: {exc}; recording the crash again", ERR)
        return False
    return True


def _without_pidfd(argv: list) -> KernelArgs:
    args = parse_args(argv)
    args.pidfd = None  # the number was the dead server's (or handler's)
    return args
