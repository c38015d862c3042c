"""The collection pipeline behind ``corepipe collect``, after capture.py's early stage.

kernel args -> config -> snapshot (checks on the captured /proc data) -> container -> store
-> preliminary record -> storage policy -> core (the captured prefix, then the pipe) -> record.
For a small core the kernel has already been let go (capture.py) and all of this runs after
the crashed process is reaped; for a bigger one the pipe is let go once the core is read.
It prints nothing; it logs one line per crash (kernel log and syslog) and an error line for
each failure. Exit codes: see commands/collect_cmd.py.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, Optional

from corepipe.domain import accounting, catalog, containers, policy, postmortem, record, snapshot
from corepipe.domain.accounting import PARTIAL_CORE
from corepipe.platform import config as configuration
from corepipe.platform import kernel
from corepipe.platform.capture import STDIN, Capture, Timeout, on_alarm, release
from corepipe.platform.log import ERR, INFO, WARNING, log
from corepipe.platform.store import CORE, RECORD, CrashDir, Store

if TYPE_CHECKING:
    from corepipe.domain.binaries import HeldFiles


def run(argv: list, early: Capture) -> int:
    """Collect the crash the kernel's ``argv`` describe, from what capture.take got; the exit code."""
    errors: list = list(early.errors)
    args = kernel.parse_args(argv)
    errors += args.errors
    problems: list = []
    try:
        cfg = configuration.load(args.config, problems)
        errors += [f"config: {p}; that key is left at its default" for p in problems]
    except configuration.ConfigError as exc:
        errors.append(f"config: {exc}; using the defaults")
        cfg = configuration.Config()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(cfg.timeout)
    try:
        return _collect(args, cfg, errors, early)
    except Timeout as exc:
        log(f"error: pid {args.pid}: {exc}", ERR)
        return 1
    except Exception as exc:  # noqa: BLE001 - the kernel shows nobody a traceback; the log must
        log(f"error: pid {args.pid}: internal error {type(exc).__name__}: {exc}", ERR)
        return 1
    finally:
        signal.alarm(0)


def _collect(args: kernel.KernelArgs, cfg: configuration.Config, errors: list, early: Capture) -> int:
    snap: Optional[snapshot.Snapshot] = None
    if early.proc is not None:
        snap = snapshot.checked(early.proc, ns_pid=args.ns_pid, uid=args.uid, gid=args.gid,
                                limit=cfg.proc_read_limit)
    if snap is not None and snap.trusted:
        container = containers.identify(snap.text("cgroup"), mountinfo=snap.text("mountinfo"),
                                        hostname=args.hostname)
        if not container.is_host:
            containers.enrich(container, pid=args.pid, parent=_ppid(snap))
    elif snap is None:
        container = containers.Container(runtime="unknown", source="none", confidence="guess")
    else:
        container = containers.Container(runtime="unknown", source="untrusted snapshot", confidence="guess")
    if early.eof:
        _let_go(early)  # the container is known: its runtime's state may go with the process
    for message in errors:
        log(f"error: pid {args.pid}: {message}", ERR)
    held = postmortem.hold(snap, cfg, early.held, early.hold_errors)
    try:
        store = Store(cfg.store)
    except OSError as exc:
        log(f"error: pid {args.pid} ({args.comm!r}): cannot open the store {cfg.store}: {exc}; core not saved", ERR)
        return 1
    with store:
        try:
            crash = store.new_crash(container.directory(), args.time)
        except OSError as exc:
            log(f"error: pid {args.pid}: cannot create a crash directory: {exc}; core not saved", ERR)
            return 1
        try:
            return _store_crash(store, crash, args, cfg, snap, container, errors, early, held)
        finally:
            if held is not None:
                held.close()
            crash.close()


def _store_crash(store: Store, crash: CrashDir, args: kernel.KernelArgs, cfg: configuration.Config,
                 snap: Optional[snapshot.Snapshot], container: containers.Container, errors: list,
                 early: Capture, held: Optional[HeldFiles]) -> int:
    rec = record.build(crash_id=crash.id, args=args, snapshot=snap, container=container,
                       redact_env=cfg.redact_env)
    rec["collector"]["errors"] = errors
    postmortem.presign(rec, early.core, held)
    _write_record(crash, rec)  # a handler killed from here on still leaves a record
    core = rec["core"]
    limit = args.core_limit_bytes() if cfg.honour_core_limit else None
    failed = bool(errors)
    if limit == 0:
        core["reason"] = "RLIMIT_CORE is 0"
    else:
        pending, core_failed = _policed_core(store, crash, args, cfg, snap, container.directory(), rec, limit, early)
        failed = _commit(store, crash, args, rec, pending) or core_failed or failed
    _let_go(early)  # also when no core is read: saving binaries need not keep the process
    postmortem.finish(store, crash, rec, held, cfg, container.is_host)
    rec["status"] = "failed" if failed else "complete"
    rec["collector"]["duration"] = round(time.monotonic() - early.started, 6)
    rec["collector"]["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _write_final(store, crash, args, rec)
    if cfg.notify_command:
        _notify(store, crash, args, rec, cfg)
    where = "/".join(container.directory())
    what = (f"core {core['size']} bytes -> {core['compressed_size']}" if core["stored"]
            else f"no core ({core['reason']})")
    log(f"pid {args.pid} ({args.comm}) signal {rec['signal']['name'] or args.signal} in {where}: "
        f"{what}, id {crash.id}", WARNING if failed else INFO)
    if args.errors:
        return 2
    return 1 if failed else 0


class _Pending:
    """Room was reserved for this crash; ``tmp`` (if any) holds its core, to be renamed to ``name``."""

    def __init__(self, fd: Optional[int] = None, tmp: Optional[str] = None, name: Optional[str] = None):
        self.fd, self.tmp, self.name = fd, tmp, name


def _policed_core(store: Store, crash: CrashDir, args: kernel.KernelArgs, cfg: configuration.Config,
                  snap: Optional[snapshot.Snapshot], group: tuple, rec: dict, limit: Optional[int],
                  early: Capture) -> tuple:
    """Read the core within the storage policy and rate limits (accounting.py).
    Returns (a _Pending when room was reserved, True if something failed)."""
    core = rec["core"]
    caps = [x for x in (limit, cfg.max_core_size) if x]
    cap = min(caps) if caps else None
    status = snap.status() if snap is not None and snap.trusted else {}
    want = policy.estimate(_kib(status.get("VmRSS"), status.get("VmSwap")), _kib(status.get("VmSize")), cap)
    try:
        admission = accounting.admit(store, cfg, crash_id=crash.id, group=group,
                                     exe=rec["exe"] or args.comm or "", want=want,
                                     signature=(rec.get("signature") or {}).get("site"))
    except (OSError, Timeout) as exc:
        return None, _not_saved(args, rec, f"storage accounting failed: {exc}")
    if not admission.budget:
        core["reason"] = admission.reason
        return None, False

    def grow(needed: int, written: int) -> int:
        return accounting.grow(store, cfg, crash_id=crash.id, group=group, needed=needed, written=written)

    pending = _Pending()
    return pending, _write_core(crash, args, cfg, rec, limit, cap, admission, grow, pending, early)


def _write_core(crash: CrashDir, args: kernel.KernelArgs, cfg: configuration.Config, rec: dict,
                limit: Optional[int], cap: Optional[int], admission: accounting.Admission,
                grow: Callable[[int, int], int], pending: _Pending, early: Capture) -> bool:
    """The captured prefix and the rest of stdin into a temporary file (``pending``); True if the core could
    not be stored whole."""
    from corepipe.platform import compress, elfcore

    core = rec["core"]
    fd, tmp = crash.open_temp(CORE)
    try:
        try:
            result = compress.compress_stream(STDIN, fd, limit=cap, prefix=early.core, eof=early.eof,
                                              level=cfg.compression_level, threads=cfg.compression_threads,
                                              max_output=admission.budget, grow=grow)
        finally:
            _let_go(early)
    except compress.OutputTooLarge as exc:
        # The storage policy's decision, like a core refused before it was read: not a failure.
        crash.discard(fd, tmp)
        core["reason"] = f"no room for the core: {exc} (limited by {admission.limited_by})"
        return False
    except (OSError, Timeout) as exc:
        crash.discard(fd, tmp)
        return _not_saved(args, rec, f"write failed: {exc}")
    if result.size == 0:
        crash.discard(fd, tmp)
        return _not_saved(args, rec, "the kernel sent no core data (the pipe was empty)")
    expected = None if result.truncated else elfcore.expected_size(result.head)
    whole = expected is None or result.size >= expected
    pending.fd, pending.tmp, pending.name = fd, tmp, CORE if whole else PARTIAL_CORE
    core.update(file=pending.name, stored=True, size=result.size, complete=whole,
                compressed_size=result.compressed_size, sha256=result.sha256, truncated=result.truncated)
    if result.truncated:
        core["reason"] = (f"truncated at RLIMIT_CORE ({limit} bytes)" if cap == limit
                          else f"truncated at max_core_size ({cap} bytes)")
    elif not whole:
        core["reason"] = (f"the core ended after {result.size} of {expected} bytes: the kernel stopped the dump "
                          f"(the process was killed) or the pipe closed early; kept as {PARTIAL_CORE}")
        rec["collector"]["errors"].append(core["reason"])
        log(f"error: pid {args.pid}: {core['reason']}", ERR)
    return not whole


def _commit(store: Store, crash: CrashDir, args: kernel.KernelArgs, rec: dict, pending: Optional[_Pending]) -> bool:
    """Put the core under its final name and record that, holding the store's lock (so a handler making
    room never sees a core whose record does not say it is stored), and give back the reservation.
    True if the core could not be put in place."""
    if pending is None:
        return False
    failed = False
    with _locked(store, args, crash) as acc:
        if pending.tmp is not None:
            try:
                crash.commit(pending.fd, pending.tmp, pending.name)
            except OSError as exc:
                crash.discard(pending.fd, pending.tmp)
                rec["core"].update(file=None, stored=False, complete=None)
                failed = _not_saved(args, rec, f"write failed: {exc}")
            _write_record(crash, rec)
        if acc is not None:
            acc.release(crash.id)
    return failed


def _write_final(store: Store, crash: CrashDir, args: kernel.KernelArgs, rec: dict) -> None:
    """The final record, under the lock: if another handler deleted the core to make room in the
    meantime, the record keeps what it said about that."""
    if not rec["core"]["stored"]:
        _write_record(crash, rec)
        return
    with _locked(store, args, crash):
        try:
            os.stat(rec["core"]["file"], dir_fd=crash.fd, follow_symlinks=False)
        except FileNotFoundError:
            try:
                rec["core"] = catalog.read_record(crash.fd)["core"]
            except (OSError, ValueError, KeyError) as exc:
                rec["core"].update(file=None, stored=False, reason=f"deleted (its record was unreadable: {exc})")
        _write_record(crash, rec)


@contextlib.contextmanager
def _locked(store: Store, args: kernel.KernelArgs, crash: CrashDir) -> Iterator[Optional[accounting.Accounting]]:
    """The store's lock, or (logged) nothing when it cannot be had: the record matters more."""
    try:
        lock = accounting.Accounting(store)
    except OSError as exc:
        log(f"error: pid {args.pid}: cannot lock the store to finish crash {crash.id}: {exc}", ERR)
        yield None
        return
    with lock:
        yield lock


def _notify(store: Store, crash: CrashDir, args: kernel.KernelArgs, rec: dict, cfg: configuration.Config) -> None:
    """The hook for a new signature (domain/notify.py), once the record is final; what it did goes in the record."""
    from corepipe.domain import notify

    try:
        result = notify.after_collection(store, rec, cfg)
    except OSError as exc:
        result = {"error": f"cannot decide whether the signature is new: {exc}"}
        log(f"error: pid {args.pid}: notify_command: {result['error']}", ERR)
    if result is not None:
        rec["notify"] = result
        _write_final(store, crash, args, rec)


def _not_saved(args: kernel.KernelArgs, rec: dict, reason: str) -> bool:
    rec["core"]["reason"] = reason
    rec["collector"]["errors"].append(f"core not saved: {reason}")
    log(f"error: pid {args.pid}: core not saved: {reason}", ERR)
    return True


def _kib(*values: Optional[str]) -> Optional[int]:
    """The sum of /proc status figures like "1234 kB"; None if the first is missing."""
    if not values or values[0] is None:
        return None
    total = 0
    for value in values:
        try:
            total += int((value or "0").split()[0])
        except (ValueError, IndexError):
            return None
    return total


def _let_go(early: Capture) -> None:
    if not early.released:
        release(STDIN)
        early.released = True


def _ppid(snap: snapshot.Snapshot) -> Optional[int]:
    """The crashed process's parent, from its snapshot: the process itself may be reaped by now."""
    try:
        return int(snap.status().get("PPid", ""))
    except ValueError:
        return None


def _write_record(crash: CrashDir, rec: dict) -> None:
    crash.write(RECORD, record.dumps(rec))
