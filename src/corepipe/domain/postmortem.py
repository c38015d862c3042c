"""The optional work of ``collect`` around the core: hold the process's files, then save them and a backtrace.

The files are opened by capture.py while the process exists, before it is known whether they
will be used; ``hold`` keeps them or closes them. ``finish`` runs after the core is committed. Nothing here may fail the
collection: every error ends up in the record (``binaries.errors``, ``backtrace.error``) and the log.
"""

from __future__ import annotations

import os
from typing import Optional

from corepipe.domain import binaries, record
from corepipe.domain.snapshot import Snapshot
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


def finish(store: Store, crash: CrashDir, rec: dict, held: Optional[binaries.HeldFiles], cfg: Config,
           is_host: bool) -> None:
    """Fill ``binaries`` and ``backtrace`` in ``rec``; closes ``held``."""
    if held is None:
        return
    try:
        if cfg.binaries:
            from corepipe.domain import accounting

            saved = binaries.save(store.fd, store.root, held, copy=cfg.binaries_host or not is_host,
                                  max_size=cfg.binaries_max_size, keep_free=accounting.measure(store, cfg)[0].keep_free,
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
    finally:
        for message in held.close():
            rec["collector"]["errors"].append(f"binaries: {message}")
            log(f"error: pid {rec.get('pid')}: binaries: {message}", ERR)
