"""The optional work of ``collect`` around the core: hold the process's files, then save them and a backtrace.

The files are opened by capture.py while the process exists, before it is known whether they
will be used; ``hold`` keeps them or closes them. ``presign`` gives the crash its crash-site signature
before the core is read; ``finish`` runs after the core is committed, and ``sign`` then replaces the
signature with the backtrace's when there is one. Nothing here may fail the collection: every error ends up in the
record (``binaries.errors``, ``backtrace.error``, ``collector.errors``) and the log.
"""

from __future__ import annotations

import os
from typing import Optional

from corepipe.domain import binaries, record, signature
from corepipe.domain.snapshot import Snapshot
from corepipe.platform import elf
from corepipe.platform.config import Config
from corepipe.platform.log import ERR, WARNING, log
from corepipe.platform.store import CrashDir, Store


def hold(snap: Optional[Snapshot], cfg: Config, entries: list, errors: list) -> Optional[binaries.HeldFiles]:
    """The exe and mapped files capture.py opened, kept if the snapshot is trusted and anything will use
    them (closed otherwise)."""
    if snap is None or not snap.trusted or not (cfg.binaries or cfg.backtrace):
        for _path, fd, _exe in entries:
            os.close(fd)
        return None
    return binaries.held(entries, errors)


def presign(rec: dict, core_head: memoryview, held: Optional[binaries.HeldFiles]) -> None:
    """``rec["signature"]`` from the crash site (the faulting instruction in the core's notes, placed with the
    captured maps): known before the core is read, so the storage policy can count cores per signature."""
    try:
        site = elf.crash_site(core_head)
        maps = (rec.get("process") or {}).get("maps")
        found = signature.Modules(maps, {}, None).locate(site["pc"]) if site else None
        # Only the two files it names: for a big core this runs before the kernel is let go.
        modules = _modules(rec, held, only={found[0]} if found else set())
        result = signature.from_site(rec, site, modules, "no backtrace yet")
        result["site"] = result["hash"]
        record.set_signature(rec, result)
    except Exception as exc:  # noqa: BLE001 - a signature must never fail the collection
        record.add_error(rec, f"signature: {exc}")
        log(f"error: pid {rec.get('pid')}: signature: {type(exc).__name__}: {exc}", ERR)


def _modules(rec: dict, held: Optional[binaries.HeldFiles], only: Optional[set] = None) -> signature.Modules:
    """The crashed process's mappings and build-ids: from ``binaries`` once saved, else read from the held files
    (of the executable and the paths in ``only``, if given)."""
    files = (rec.get("binaries") or {}).get("files")
    if files:
        ids = {f["path"]: f["build_id"] for f in files if f.get("build_id")}
        exe = next((f["path"] for f in files if f.get("exe")), None)
    else:
        entries = held.files if held is not None else []
        ids = {h.path: bid for h in entries if only is None or h.exe or h.path in only
               for bid in [elf.build_id(h.fd)] if bid}
        exe = next((h.path for h in entries if h.exe), None)
    return signature.Modules((rec.get("process") or {}).get("maps"), ids, exe)


def _sign(rec: dict, held: Optional[binaries.HeldFiles], cfg: Config) -> None:
    """The backtrace's signature in place of the crash site's, or the crash site's with why there are no frames."""
    site = rec.get("signature")
    if site is None:
        return
    trace = rec.get("backtrace")
    modules = _modules(rec, held)
    result = None
    if trace and trace.get("frames"):
        result = signature.from_frames(rec, trace["frames"], modules)
    if result is None:
        result = dict(site, fallback_reason=_no_frames(rec, held, cfg))
    result["site"] = site.get("site")
    record.set_signature(rec, result)


def _no_frames(rec: dict, held: Optional[binaries.HeldFiles], cfg: Config) -> str:
    trace = rec.get("backtrace")
    if not cfg.backtrace:
        return "backtrace is off (config backtrace = false)"
    skipped = (rec.get("postmortem") or {}).get("skipped")
    if skipped:
        return f"no backtrace: {skipped}"
    if held is None:
        return "no backtrace: the crashed process's snapshot is not trusted, so its files were not held"
    if not rec["core"]["stored"]:
        return f"no backtrace: no core stored ({rec['core'].get('reason')})"
    if trace is None:
        return "no backtrace: neither gdb nor eu-stack is installed"
    if trace.get("error"):
        return f"no backtrace: {trace['error']}"
    if trace.get("frames") is None:
        return f"{trace.get('tool')} gave no frames of the crashing thread"
    return "no frame of the crashing thread is left after the skip rules"


def finish(store: Store, crash: CrashDir, rec: dict, held: Optional[binaries.HeldFiles], cfg: Config,
           is_host: bool, keep_free: int) -> None:
    """Fill ``binaries`` and ``backtrace`` in ``rec``; ``held`` stays open for ``sign`` (the caller closes it).
    ``keep_free``: the effective one of the crash's limits (accounting.measure), which saved binaries leave."""
    if held is None:
        return
    try:
        if cfg.binaries:
            saved = binaries.save(store.fd, store.root, held, copy=cfg.binaries_host or not is_host,
                                  max_size=cfg.binaries_max_size, keep_free=keep_free,
                                  core_kept=bool(rec["core"]["stored"]))
            record.set_binaries(rec, saved)
        if cfg.backtrace and rec["core"]["stored"]:
            from corepipe.domain import backtrace

            result = backtrace.take(store.fd, crash.path, rec, held, timeout=cfg.backtrace_timeout,
                                    max_core_size=cfg.backtrace_max_core_size)
            if result is not None:
                record.set_backtrace(rec, result)
                if result["error"]:
                    log(f"pid {rec.get('pid')}: no backtrace: {result['error']}", WARNING)
        for message in (rec.get("binaries") or {}).get("errors") or []:
            log(f"pid {rec.get('pid')}: binaries: {message}", WARNING)
    except Exception as exc:  # noqa: BLE001 - as above; the collect timeout included
        record.add_error(rec, f"binaries/backtrace: {exc}")
        log(f"error: pid {rec.get('pid')}: binaries/backtrace: {type(exc).__name__}: {exc}", ERR)


def release(rec: dict, held: Optional[binaries.HeldFiles]) -> None:
    """Close the crashed process's held files before the final record, so that a failed close is in it."""
    if held is None:
        return
    for message in held.close():
        rec["collector"]["errors"].append(f"binaries: {message}")
        log(f"error: pid {rec.get('pid')}: binaries: {message}", ERR)


def sign(rec: dict, held: Optional[binaries.HeldFiles], cfg: Config) -> None:
    """The final ``signature``, after ``finish`` (or without it: a storm skipped it, nothing was held)."""
    try:
        _sign(rec, held, cfg)
    except Exception as exc:  # noqa: BLE001 - a signature must never fail the collection
        record.add_error(rec, f"signature: {exc}")
        log(f"error: pid {rec.get('pid')}: signature: {type(exc).__name__}: {exc}", ERR)
