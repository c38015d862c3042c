"""``corepipe collect``: the kernel's pipe handler (kernel args -> snapshot -> container -> store -> record).

Runs as root with an empty environment, cwd /, no usable stdout/stderr and the crashed
process held by the kernel. It prints nothing; it logs one line per crash (kernel log
and syslog) and an error line for each failure. Exit codes: 0 stored as configured,
1 something failed (the record says what), 2 bad arguments.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from typing import TYPE_CHECKING, Optional

from corepipe import config as configuration
from corepipe import containers, kernel, postmortem, record, snapshot
from corepipe.log import ERR, INFO, WARNING, log
from corepipe.store import CORE, RECORD, CrashDir, Store

if TYPE_CHECKING:
    from corepipe.binaries import HeldFiles

STDIN = 0


class Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise Timeout("the handler's time limit ran out")


def run(argv: list) -> int:
    started = time.monotonic()
    errors: list = []
    args = kernel.parse_args(argv)
    errors += args.errors
    problems: list = []
    try:
        cfg = configuration.load(args.config, problems)
        errors += [f"config: {p}; that key is left at its default" for p in problems]
    except configuration.ConfigError as exc:
        errors.append(f"config: {exc}; using the defaults")
        cfg = configuration.Config()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(cfg.timeout)
    try:
        return _collect(args, cfg, errors, started)
    except Timeout as exc:
        log(f"error: pid {args.pid}: {exc}", ERR)
        return 1
    except Exception as exc:  # noqa: BLE001 - the kernel shows nobody a traceback; the log must
        log(f"error: pid {args.pid}: internal error {type(exc).__name__}: {exc}", ERR)
        return 1
    finally:
        signal.alarm(0)


def _collect(args: kernel.KernelArgs, cfg: configuration.Config, errors: list, started: float) -> int:
    snap: Optional[snapshot.Snapshot] = None
    if args.pid is not None:
        snap = snapshot.take(args.pid, ns_pid=args.ns_pid, uid=args.uid, gid=args.gid, pidfd=args.pidfd,
                             limit=cfg.proc_read_limit)
    if snap is not None and snap.trusted:
        container = containers.identify(snap.text("cgroup"), mountinfo=snap.text("mountinfo"),
                                        hostname=args.hostname)
        if not container.is_host:
            containers.enrich(container, pid=args.pid)
    elif snap is None:
        container = containers.Container(runtime="unknown", source="none", confidence="guess")
    else:
        container = containers.Container(runtime="unknown", source="untrusted snapshot", confidence="guess")
    for message in errors:
        log(f"error: pid {args.pid}: {message}", ERR)
    held = postmortem.hold(snap, cfg)
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
            return _store_crash(store, crash, args, cfg, snap, container, errors, started, held)
        finally:
            if held is not None:
                held.close()
            crash.close()
            if snap is not None:
                snap.close()


def _store_crash(store: Store, crash: CrashDir, args: kernel.KernelArgs, cfg: configuration.Config,
                 snap: Optional[snapshot.Snapshot], container: containers.Container, errors: list,
                 started: float, held: Optional[HeldFiles]) -> int:
    rec = record.build(crash_id=crash.id, args=args, snapshot=snap, container=container,
                       redact_env=cfg.redact_env)
    rec["collector"]["errors"] = errors
    _write_record(crash, rec)  # a handler killed from here on still leaves a record
    core = rec["core"]
    limit = args.core_limit_bytes() if cfg.honour_core_limit else None
    failed = bool(errors)
    if limit == 0:
        core["reason"] = "RLIMIT_CORE is 0"
    else:
        fd, tmp = crash.open_temp(CORE)
        try:
            from corepipe import compress

            compress.widen_pipe(STDIN)
            try:
                result = compress.compress_stream(STDIN, fd, limit=limit, level=cfg.compression_level,
                                                  threads=cfg.compression_threads)
            finally:
                _release(STDIN)
        except (OSError, Timeout) as exc:
            crash.discard(fd, tmp)
            failed = True
            core["reason"] = f"write failed: {exc}"
            errors.append(f"core not saved: {exc}")
            log(f"error: pid {args.pid}: core not saved: {exc}", ERR)
        else:
            crash.commit(fd, tmp, CORE)
            core.update(file=CORE, stored=True, size=result.size, compressed_size=result.compressed_size,
                        sha256=result.sha256, truncated=result.truncated)
            if result.truncated:
                core["reason"] = f"truncated at RLIMIT_CORE ({limit} bytes)"
    postmortem.finish(store, crash, rec, held, cfg, container.is_host)
    rec["status"] = "failed" if failed else "complete"
    rec["collector"]["duration"] = round(time.monotonic() - started, 6)
    rec["collector"]["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _write_record(crash, rec)
    where = "/".join(container.directory())
    what = (f"core {core['size']} bytes -> {core['compressed_size']}" if core["stored"]
            else f"no core ({core['reason']})")
    log(f"pid {args.pid} ({args.comm}) signal {rec['signal']['name'] or args.signal} in {where}: "
        f"{what}, id {crash.id}", WARNING if failed else INFO)
    if args.errors:
        return 2
    return 1 if failed else 0


def _release(fd: int) -> None:
    """Let go of the kernel's pipe once the core is read: the kernel holds the crashed process (and its
    container's restart) until every reader has closed it, and fsyncing the core, saving binaries and
    taking a backtrace need not keep it waiting. /dev/null takes the fd's place, so no later open reuses it."""
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)
    except OSError:
        try:
            os.close(fd)
        except OSError:
            pass


def _write_record(crash: CrashDir, rec: dict) -> None:
    crash.write(RECORD, record.dumps(rec))
