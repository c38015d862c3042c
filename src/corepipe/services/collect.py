"""The collection pipeline, one for every entry point, after capture.py's early stage.

kernel args -> config -> ``prepare`` (snapshot: checks on the captured /proc data; container) -> the
entry point's decision before the core (``refusal``) -> store -> preliminary record -> storage policy
-> core -> binaries, backtrace -> record. As systemd-coredump feeds one ``coredump_submit`` from its
argv and from its socket peer, the front ends only build a Context: ``run`` from the kernel's argv
(the pipe handler, and a server's worker for a crash a handler forwarded), serve's worker from a
coredump socket peer (platform/coredump_socket.kernel_args), ``collect`` for a crash known only from a
journal; ``run_context`` runs the stages, and a socket peer's ack to the kernel is its ``before_core``.
It prints nothing; it logs one line per crash and an error line for each failure. Exit codes: see
commands/collect_cmd.py.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from typing import Optional

from corepipe.domain import accounting, binaries, catalog, containers, corefile, policy, postmortem, record, snapshot
from corepipe.domain.books import Books
from corepipe.domain.context import Context
from corepipe.platform import affinity, journal, kernel, procfs, slots
from corepipe.platform import config as configuration
from corepipe.platform.capture import STDIN, Capture, Timeout, on_alarm
from corepipe.platform.log import ERR, INFO, WARNING, log
from corepipe.platform.store import FAILED, RECORD, CrashDir, Store


def run(argv: list, early: Capture, *, cfg: Optional[configuration.Config] = None, problems: tuple = (),
        refused: Optional[str] = None, transport: str = "pipe", entry: Optional[str] = None) -> int:
    """``corepipe collect``: the crash the kernel's ``argv`` describe, from what capture.take got on stdin,
    bounded by the config's ``timeout`` (SIGALRM); the exit code. A server's worker collecting a crash a
    handler handed over passes its own ``cfg`` (and its ``problems``), ``refused`` (record only: why) and
    ``transport`` ("forwarded"), and the server's journal ``entry``."""
    args = kernel.parse_args(argv)
    errors = list(early.errors) + args.errors + list(problems)
    if cfg is None:
        cfg = load_config(args.config, errors)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(cfg.timeout)
    try:
        shared_cpu = affinity.for_crash(args.tid, args.pid, args.pidfd) if refused is None else None
        return run_context(Context(args=args, early=early, core_fd=STDIN, cfg=cfg, errors=errors, refused=refused,
                                   shared_cpu=shared_cpu, transport=transport, journal=entry))
    finally:
        signal.alarm(0)


def collect(args: kernel.KernelArgs, early: Capture, *, core_fd: int = STDIN,
            cfg: Optional[configuration.Config] = None, refused: Optional[str] = None) -> int:
    """The pipeline for a second entry point (a socket server, a test): the crash ``args`` describe, its core
    on ``core_fd`` after what ``early`` (capture.take_process) read of it. No alarm is set: the caller bounds
    the time. ``refused``: the reason no core is to be read (decided before the dump). Never raises; the exit
    code ``corepipe collect`` would give."""
    errors = list(early.errors) + list(args.errors)
    if cfg is None:
        cfg = load_config(args.config, errors)
    return run_context(Context(args=args, early=early, core_fd=core_fd, cfg=cfg, errors=errors, refused=refused))


def run_context(ctx: Context, before_core: Optional[Callable[[Context], None]] = None) -> int:
    """Every stage for ``ctx``; never raises (the kernel shows nobody a traceback: everything is logged).
    ``before_core``: what the entry point does once the crash is ``prepare``d and before its core is read (a
    coredump socket peer: the ack, KERNEL or REJECT with ``refusal``'s reason in ``ctx.refused``)."""
    try:
        return _stages(ctx, before_core)
    except Timeout as exc:
        log(f"error: pid {ctx.args.pid}: {exc}", ERR)
        _final_failed(ctx, str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - see above
        log(f"error: pid {ctx.args.pid}: internal error {type(exc).__name__}: {exc}", ERR)
        _final_failed(ctx, f"internal error {type(exc).__name__}: {exc}")
        return 1
    finally:
        if ctx.held is not None:
            for message in ctx.held.close():
                log(f"error: pid {ctx.args.pid}: binaries: {message}", ERR)
        if ctx.crash is not None:
            ctx.crash.close()
            ctx.crash = None
        if ctx.store is not None:
            ctx.store.close()
            ctx.store = None


def _final_failed(ctx: Context, what: str) -> None:
    """After the first record, any error still ends with a final record (never left at "collecting"); before
    it (a timeout while the container is identified, say), the crash is still filed, in store.FAILED."""
    if ctx.record is None:
        _file_failed(ctx, what)
        return
    if ctx.crash is None:
        return
    record.add_error(ctx.record, what)
    finish(ctx, failed=True)
    try:
        write_record(ctx)
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: cannot write the final record of {ctx.crash.id}: {exc}", ERR)


def _file_failed(ctx: Context, what: str) -> None:
    """A record without the core in store.FAILED for a crash whose collection failed before its first record."""
    if ctx.container is None:
        ctx.container = containers.Container(runtime="unknown", source="not identified", confidence="guess")
    if ctx.store is None:
        ctx.store = open_store(ctx)
    if ctx.store is None:
        return
    try:
        ctx.crash = ctx.store.new_crash((FAILED,), ctx.args.time)
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: cannot create a crash directory in {FAILED}: {exc}; nothing recorded", ERR)
        return
    ctx.errors.append(what)
    build_record(ctx)
    record.core_refused(ctx.record, f"not saved: {what}")
    finish(ctx, failed=True)
    try:
        write_record(ctx)
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: cannot write the record of {ctx.crash.id}: {exc}", ERR)


def finish(ctx: Context, *, failed: bool) -> None:
    """The record's final status and what collecting it cost: time since the crash came, CPU of this process
    (its zstd workers included) and its peak memory."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record.finish(ctx.record, failed=failed, duration=time.monotonic() - ctx.early.started,
                  cpu=usage.ru_utime + usage.ru_stime, peak_rss=usage.ru_maxrss * 1024)


def load_config(path: Optional[str], errors: list,
                keys: Optional[frozenset] = configuration.COLLECTOR) -> configuration.Config:
    """The config at ``path``, by default the keys the collector reads (a bad ``ship_to`` is no error of a
    crash's; ``None``: every key); what is wrong with it goes to ``errors`` and falls back to the defaults."""
    problems: list = []
    try:
        cfg = configuration.load(path, problems, keys)
    except configuration.ConfigError as exc:
        errors.append(f"config: {exc}; using the defaults")
        return configuration.Config()
    errors += [f"config: {p}; that key is left at its default" for p in problems]
    return cfg


def _stages(ctx: Context, before_core: Optional[Callable[[Context], None]]) -> int:
    args = ctx.args
    prepare(ctx)
    if before_core is not None:
        before_core(ctx)
    if ctx.early.eof:
        ctx.let_go()  # the container is known: its runtime's state may go with the process
    for message in ctx.errors:
        log(f"error: pid {args.pid}: {message}", ERR)
    ctx.held = postmortem.hold(ctx.snapshot, ctx.cfg, ctx.early.held, ctx.early.hold_errors)
    ctx.store = open_store(ctx)
    if ctx.store is None:
        return 1
    ctx.crash = new_crash(ctx)
    if ctx.crash is None:
        return 1
    return store_crash(ctx)


def prepare(ctx: Context) -> None:
    """What every entry point knows of the crash before its core: the trust-checked snapshot and the container."""
    ctx.snapshot = take_snapshot(ctx)
    ctx.container = identify(ctx)


def refusal(ctx: Context, *, room: bool = False) -> Optional[str]:
    """Why the ``prepare``d crash gets no core, decided before a byte of it is read; None: read it. The entry
    point's own reason (``ctx.refused``), RLIMIT_CORE 0, the config's exclusions; with ``room`` also the rate
    limits and the store's room after the policy's deletions, for an entry point that can still spare the kernel
    the dump (a coredump socket peer: REJECT); a pipe's core comes anyway and ``admit`` decides on it."""
    limit = ctx.args.core_limit_bytes() if ctx.cfg.honour_core_limit else None
    reason = ctx.refused or ("RLIMIT_CORE is 0" if limit == 0 else None) or excluded(ctx)
    snap = ctx.snapshot
    if reason is not None or not room or snap is None or not snap.trusted:
        return reason
    try:
        with Store(ctx.cfg.store) as store:
            return accounting.refusal(store, ctx.cfg, group=ctx.group, exe=snap.exe or ctx.args.comm or "")
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: rate limits and room not checked before the dump: {exc}", ERR)
        return None


def take_snapshot(ctx: Context) -> Optional[snapshot.Snapshot]:
    """The trust-checked snapshot of what capture read of /proc/<pid>, or None when nothing was read."""
    if ctx.early.proc is None:
        return None
    args = ctx.args
    return snapshot.checked(ctx.early.proc, ns_pid=args.ns_pid, uid=args.uid, gid=args.gid,
                            limit=ctx.cfg.proc_read_limit, dump_time=args.time)


def identify(ctx: Context) -> containers.Container:
    """The container the crashed process ran in, from a trusted snapshot only, confirmed by its runtime's state
    and the process's namespaces (containers.of_process); and the user a subordinate uid belongs to."""
    snap, proc = ctx.snapshot, ctx.early.proc
    try:
        if snap is None:
            container = containers.Container(runtime="unknown", source="none", confidence="guess")
        elif not snap.trusted:
            container = containers.Container(runtime="unknown", source="untrusted snapshot", confidence="guess")
        else:
            container = containers.of_process(snap, proc, hostname=ctx.args.hostname)
        containers.attribute(container, ctx.args.uid, proc.user_ns_fd if proc is not None and snap is not None
                   and snap.trusted else None)
        return container
    finally:
        for name in ("pid_ns_fd", "user_ns_fd"):  # only identification needs them
            if proc is not None and getattr(proc, name) is not None:
                os.close(getattr(proc, name))
                setattr(proc, name, None)


def open_store(ctx: Context) -> Optional[Store]:
    try:
        return Store(ctx.cfg.store)
    except OSError as exc:
        log(f"error: pid {ctx.args.pid} ({ctx.args.comm!r}): cannot open the store {ctx.cfg.store}: {exc}; "
            "core not saved", ERR)
        return None


def new_crash(ctx: Context) -> Optional[CrashDir]:
    """The crash's directory; when it cannot be made (a link planted in its place), one in store.FAILED, and
    ``ctx.unfiled`` says why (the crash is then recorded without its core)."""
    where = "/".join(ctx.group)
    try:
        return ctx.store.new_crash(ctx.group, ctx.args.time)
    except OSError as exc:
        ctx.unfiled = f"cannot create its directory under {where}: {exc}"
    log(f"error: pid {ctx.args.pid}: {ctx.unfiled}; filing the record in {FAILED} without the core", ERR)
    ctx.errors.append(ctx.unfiled)
    try:
        return ctx.store.new_crash((FAILED,), ctx.args.time)
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: cannot create a crash directory in {FAILED} either: {exc}; "
            "nothing recorded", ERR)
        return None


def store_crash(ctx: Context) -> int:
    """Record, core (within the policy), binaries and backtrace, final record; the exit code."""
    args, cfg, crash = ctx.args, ctx.cfg, ctx.crash
    rec = build_record(ctx)
    postmortem.presign(rec, ctx.early.core, ctx.held)  # before the core: the policy may count its signature
    if not _below_keep_free(ctx):  # past keep_free no record is written, not even the first (write_final)
        write_record(ctx)  # a handler killed from here on still leaves a record
    limit = args.core_limit_bytes() if cfg.honour_core_limit else None
    storm = None
    if ctx.unfiled is not None:
        record.core_refused(rec, f"not saved: the crash {ctx.unfiled}")
    elif (reason := refusal(ctx)) is not None:
        record.core_refused(rec, reason)
    else:
        with _turn(ctx, slots.core_turn(ctx.store, cfg)) as turn:  # a storm's bound, before the core is read
            storm = turn.refused
            if storm is not None:
                record.core_refused(rec, storm)
                record.omit_details(rec, "no core kept")  # a storm's records stay small
            else:
                caps = [x for x in (limit, cfg.max_core_size) if x]
                cap = min(caps) if caps else None
                admission = admit(ctx, cap)
                if admission is not None and admission.budget:
                    commit(ctx, corefile.write(ctx, admission, limit, cap, turn.index))
    ctx.let_go()  # also when no core is read: saving binaries need not keep the process
    if storm is None and ctx.unfiled is None and ctx.held is not None:  # a crash refused in a storm stays cheap
        with _turn(ctx, slots.postmortem_turn(ctx.store, cfg)) as turn:  # bounded after the kernel is let go
            if turn.refused is not None:
                record.postmortem_skipped(rec, turn.refused)
            else:
                postmortem.finish(ctx.store, crash, rec, ctx.held, cfg, ctx.container.is_host, ctx.limits.keep_free)
    postmortem.sign(rec, ctx.held, cfg)
    postmortem.release(rec, ctx.held)
    failed = record.has_errors(rec)  # after the post-mortem: its failures (a bug, the time limit, a close) count too
    finish(ctx, failed=failed)
    write_final(ctx)
    if cfg.notify_command and ctx.uncounted is None:
        _notify(ctx)
    core = rec["core"]
    where = "/".join(ctx.group)
    what = (f"core {core['size']} bytes -> {core['compressed_size']}" if core["stored"]
            else f"no core ({core['reason']})" if ctx.uncounted is None
            else f"no core ({core['reason']}) and no record, counted instead ({ctx.uncounted})")
    log(f"pid {args.pid} ({args.comm}) signal {rec['signal']['name'] or args.signal} in {where}: "
        f"{what}, id {crash.id}", WARNING if failed else INFO)
    if args.errors:
        return 2
    return 1 if failed else 0


def build_record(ctx: Context) -> dict:
    """``ctx.record``: the crash's first record, from what is known before the core."""
    cfg = ctx.cfg
    ctx.record = record.build(crash_id=ctx.crash.id, args=ctx.args, snapshot=ctx.snapshot, container=ctx.container,
                              redact_env=cfg.redact_env, errors=tuple(ctx.errors), received=ctx.early.received,
                              env_keep=cfg.env_keep, redact_args=cfg.redact_args, field_max=cfg.record_field_max,
                              transport=ctx.transport)
    return ctx.record


def excluded(ctx: Context) -> Optional[str]:
    """Why the config excludes this crash from a core (policy.excluded), from its trusted snapshot and container."""
    snap, container, cfg = ctx.snapshot, ctx.container, ctx.cfg
    exe = snap.exe if snap is not None and snap.trusted else None
    return policy.excluded(exe=exe or ctx.args.comm or "", container_name=container.name,
                           container_id=container.id, image=container.image, executables=cfg.exclude_executables,
                           containers=cfg.exclude_containers, images=cfg.exclude_images)


def admit(ctx: Context, cap: Optional[int]) -> Optional[accounting.Admission]:
    """The storage policy's and rate limits' decision on this core (accounting.py); None if it failed."""
    rec = ctx.record
    status = ctx.snapshot.status() if ctx.snapshot is not None and ctx.snapshot.trusted else {}
    want = policy.estimate(procfs.kib(status.get("VmRSS"), status.get("VmSwap")), procfs.kib(status.get("VmSize")),
                           cap)
    try:
        admission = accounting.admit(ctx.store, ctx.cfg, crash_id=ctx.crash.id, group=ctx.group,
                                     exe=rec["exe"] or ctx.args.comm or "", want=want,
                                     signature=(rec.get("signature") or {}).get("site"), lim=ctx.limits)
    except (OSError, Timeout) as exc:
        corefile.not_saved(ctx, f"storage accounting failed: {exc}")
        return None
    if not admission.budget:
        record.core_refused(rec, admission.reason)
        record.omit_details(rec, "no core kept")  # a crash loop's records stay small
    return admission


def commit(ctx: Context, staged: Optional[corefile.Staged]) -> None:
    """Put the core under its final name, in the ledger and in the record, holding the store's lock (so a
    handler making room never sees a core whose record does not say it is stored), and give back the
    reservation."""
    with _locked(ctx) as books:
        if staged is not None:
            try:
                ctx.crash.commit(staged.fd, staged.tmp, staged.name)
            except OSError as exc:
                ctx.crash.discard(staged.fd, staged.tmp)
                corefile.not_saved(ctx, f"write failed: {exc}")
            else:
                if books is not None:
                    books.add_core(ctx.crash, "/".join(ctx.group), staged.name)
            write_record(ctx)
        if books is not None:
            accounting.release(books, ctx.crash.id)



def _below_keep_free(ctx: Context) -> bool:
    """The crash's first measurement: its limits (``ctx.limits``, shared by the later ones); the free space is
    measured again where it counts (admission and growth under the lock, the final record), as it changes."""
    ctx.limits, free = accounting.measure(ctx.store, ctx.cfg)
    return bool(ctx.limits.keep_free) and free < ctx.limits.keep_free


def write_final(ctx: Context) -> None:
    """The final record, under the lock, counted in the ledger (in its group's records). A crash without a core
    gets a small record (record.coreless), and none when its group's records are over their budget or the disk
    below keep_free: a counter in the books instead. The binaries saved for a stored core now count it among
    their users; if another handler deleted the core to make room in the meantime, the record keeps what it
    said about that, and the binaries only this crash would have used go."""
    rec, crash = ctx.record, ctx.crash
    group = catalog.group_of(crash.path, ctx.store.root)[0]  # where it is filed (.failed when it could not be)
    with _locked(ctx) as books:
        if not rec["core"]["stored"]:
            size = -(-len(record.coreless(rec, "no core kept")) // 4096) * 4096  # as the disk counts it
            if books is not None and ctx.unfiled is None:
                ctx.uncounted = accounting.record_refusal(books, ctx.cfg, group, size, ctx.limits)
                if ctx.uncounted is not None:
                    books.count_instead(crash, group, ctx.uncounted)
                    journal.done(ctx.journal)  # counted: a server need not record it from its journal
                    return
            write_record(ctx)
            if books is not None:
                books.add_record(crash, group)
            return
        try:
            os.stat(rec["core"]["file"], dir_fd=crash.fd, follow_symlinks=False)
        except FileNotFoundError:
            saved = binaries.referenced([rec])
            try:
                record.core_as_on_disk(rec, catalog.read_record(crash.fd)["core"])
            except (OSError, ValueError, KeyError) as exc:
                record.core_deleted(rec, f"its record was unreadable: {exc}")
            if books is not None:
                books.drop_binaries(saved)
        else:
            if books is not None:
                books.add_binaries(ctx.crash, group, rec)
        write_record(ctx)
        if books is not None:
            books.add_record(crash, group)


@contextlib.contextmanager
def _locked(ctx: Context) -> Iterator[Optional[Books]]:
    """The store's lock, or (logged) nothing when it cannot be had: the record matters more."""
    try:
        lock = Books(ctx.store)
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: cannot lock the store to finish crash {ctx.crash.id}: {exc}", ERR)
        yield None
        return
    with lock:
        yield lock


def _turn(ctx: Context, turn: slots.Turn) -> slots.Turn:
    """``turn``, with its error (the slots could not be used, so the work goes on unbounded) in the record."""
    if turn.error:
        record.add_error(ctx.record, turn.error)
    return turn


def _notify(ctx: Context) -> None:
    """The hook for a new signature (domain/notify.py), once the record is final; what it did goes in the record."""
    from corepipe.domain import notify

    try:
        result = notify.after_collection(ctx.store, ctx.record, ctx.cfg, ctx.group)
    except (OSError, Timeout) as exc:
        result = {"error": f"cannot decide whether the signature is new: {exc}"}
        log(f"error: pid {ctx.args.pid}: notify_command: {result['error']}", ERR)
    if result is not None:
        record.set_notify(ctx.record, result)
        with _locked(ctx) as books:
            if books is None:
                write_record(ctx)
            else:
                books.rewrite_record(ctx.crash, catalog.group_of(ctx.crash.path, ctx.store.root)[0],
                                     lambda: write_record(ctx))


def write_record(ctx: Context) -> None:
    ctx.crash.write(RECORD, record.dumps(ctx.record))
    if ctx.journal is not None:  # the server's entry names the record until it is final (platform/journal.py)
        ctx.journal = journal.recorded(ctx.journal, ctx.crash.path, ctx.record["status"] != "collecting")
