"""The optional work of ``collect`` around the core: hold the process's files, then save them and a backtrace.

``hold`` is cheap and runs before the core is read (the files must be opened while the
process exists); ``finish`` runs after the core is committed. Nothing here may fail the
collection: every error ends up in the record (``binaries.errors``, ``backtrace.error``) and the log.
"""

from __future__ import annotations

from typing import Optional

from corepipe import binaries
from corepipe.config import Config
from corepipe.log import ERR, WARNING, log
from corepipe.snapshot import Snapshot
from corepipe.store import CrashDir, Store


def hold(snap: Optional[Snapshot], cfg: Config) -> Optional[binaries.HeldFiles]:
    """Open the exe and mapped files of a trusted snapshot, if anything will use them."""
    if snap is None or not snap.trusted or snap.dir_fd is None or not (cfg.binaries or cfg.backtrace):
        return None
    try:
        return binaries.hold(snap.dir_fd, snap.text("maps"), snap.exe)
    except Exception as exc:  # noqa: BLE001 - optional work must never cost the core
        log(f"error: pid {snap.pid}: cannot hold its files: {exc}", ERR)
        return None


def finish(store: Store, crash: CrashDir, rec: dict, held: Optional[binaries.HeldFiles], cfg: Config,
           is_host: bool) -> None:
    """Fill ``binaries`` and ``backtrace`` in ``rec``; closes ``held``."""
    if held is None:
        return
    try:
        if cfg.binaries:
            from corepipe import accounting

            rec["binaries"] = binaries.save(store.fd, store.root, held, copy=cfg.binaries_host or not is_host,
                                            max_size=cfg.binaries_max_size,
                                            keep_free=accounting.measure(store, cfg)[0].keep_free)
        if cfg.backtrace and rec["core"]["stored"]:
            from corepipe import backtrace

            result = backtrace.take(store.fd, crash.path, rec, held, timeout=cfg.backtrace_timeout,
                                    max_core_size=cfg.backtrace_max_core_size)
            if result is not None:
                rec["backtrace"] = result
                if result["error"]:
                    log(f"pid {rec.get('pid')}: no backtrace: {result['error']}", WARNING)
        for message in (rec.get("binaries") or {}).get("errors") or []:
            log(f"pid {rec.get('pid')}: binaries: {message}", WARNING)
    except Exception as exc:  # noqa: BLE001 - as above; the collect timeout included
        rec["collector"]["errors"].append(f"binaries/backtrace: {exc}")
        log(f"error: pid {rec.get('pid')}: binaries/backtrace: {type(exc).__name__}: {exc}", ERR)
    finally:
        held.close()
