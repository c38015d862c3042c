"""The JSON record filed beside each core: a documented, versioned schema (see README, "Record")."""

from __future__ import annotations

import json
import signal as signals
import time
from typing import Optional

from corepipe import __version__
from corepipe.domain.containers import Container
from corepipe.domain.snapshot import Snapshot
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import binary_name

SCHEMA = 1
REDACTED = "<redacted>"


def signal_name(number: Optional[int]) -> Optional[str]:
    try:
        return signals.Signals(number).name if number is not None else None
    except ValueError:
        return None


def redact(environ: list, patterns: list) -> list:
    """Values of variables whose name looks like a secret are replaced; names are kept."""
    upper = [p.upper() for p in patterns]
    result = []
    for entry in environ:
        name, sep, _value = entry.partition("=")
        if sep and any(p in name.upper() for p in upper):
            result.append(f"{name}={REDACTED}")
        else:
            result.append(entry)
    return result


def build(*, crash_id: str, args: KernelArgs, snapshot: Optional[Snapshot], container: Container,
          redact_env: list, errors: tuple = ()) -> dict:
    """The record before the core is stored (``errors``: the collection's so far); ``core`` and ``collector``
    are filled in as collection goes on, through the functions below."""
    snap = snapshot
    status = snap.status() if snap else {}
    when = args.time if args.time is not None else int(time.time())
    return {
        "schema": SCHEMA,
        "id": crash_id,
        "status": "collecting",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
        "timestamp": when,
        "pid": args.pid,
        "ns_pid": args.ns_pid,
        "tid": args.tid,
        "uid": args.uid,
        "gid": args.gid,
        "signal": {"number": args.signal, "name": signal_name(args.signal)},
        "comm": args.comm,
        "exe": snap.exe if snap else None,
        "cmdline": snap.cmdline() if snap else [],
        "cwd": snap.cwd if snap else None,
        "hostname": args.hostname,
        "dump_mode": args.dump_mode,
        "core_limit": args.core_limit,
        "container": container.to_dict(),
        "cgroup": snap.text("cgroup") if snap else None,
        "process": {
            "comm": snap.text("comm").rstrip("\n") if snap else None,
            "root": snap.root if snap else None,
            "status": status,
            "limits": snap.text("limits") if snap else None,
            "environ": redact(snap.environ(), redact_env) if snap else [],
            "maps": snap.text("maps") if snap else None,
            "mountinfo": snap.text("mountinfo") if snap else None,
            "trusted": snap.trusted if snap else False,
            "untrusted_reasons": list(snap.untrusted) if snap else ["no snapshot"],
            "errors": list(snap.errors) if snap else [],
        },
        "core": {
            "file": None,
            "stored": False,
            "reason": None,
            "size": None,
            "compressed_size": None,
            "sha256": None,  # in records before core.digest; kept, null: keys are only ever added
            "digest": None,
            "truncated": False,
            "complete": None,
            "compression": "zstd",
        },
        "collector": {"version": __version__, "duration": None, "peak_rss": None, "errors": list(errors)},
    }


# -- the named changes a record goes through (collect, postmortem, accounting and catalog use only these) --


def add_error(record: dict, message: str) -> None:
    """A failure of this collection; a record with errors ends as ``failed``."""
    record["collector"]["errors"].append(message)


def has_errors(record: dict) -> bool:
    return bool(record["collector"]["errors"])


def core_refused(record: dict, reason: str) -> None:
    """The storage policy (or RLIMIT_CORE) decided not to store the core: not a failure."""
    record["core"]["reason"] = reason


def postmortem_skipped(record: dict, reason: str) -> None:
    """No binaries saved and no backtrace taken, by a storm's bound (platform/slots.py): not a failure."""
    record["postmortem"] = {"skipped": reason}


def core_not_saved(record: dict, reason: str) -> None:
    """The core could not be stored (a failure): no file, the reason, and an error."""
    record["core"].update(file=None, stored=False, complete=None, reason=reason)
    add_error(record, f"core not saved: {reason}")


def core_stored(record: dict, *, file: str, size: int, compressed_size: int, digest: dict, truncated: bool,
                complete: bool, reason: Optional[str] = None) -> None:
    """The core is in the crash directory as ``file`` (store.CORE, or store.PARTIAL_CORE when cut short)."""
    record["core"].update(file=file, stored=True, size=size, compressed_size=compressed_size, digest=digest,
                          truncated=truncated, complete=complete, reason=reason)


def core_deleted(record: dict, reason: str) -> None:
    """The core was deleted (to make room, or by prune); the record stays, and so do the binaries' names,
    which are no longer kept either (binaries live as long as a core that needs them)."""
    record["core"].update(stored=False, file=None, reason=f"deleted: {reason}")
    binaries_dropped(record, "deleted with the core")


def core_as_on_disk(record: dict, stored: dict) -> None:
    """Take the ``core`` of the record on disk, which another handler changed (it deleted the core); the
    binaries saved for it are not kept either."""
    record["core"] = stored
    binaries_dropped(record, "deleted with the core")


def binaries_dropped(record: dict, reason: str, only: Optional[set] = None) -> None:
    """The saved binaries of this crash (those of the keys ``only``, "xx/name" below .build-id) are no longer
    kept for it."""
    for entry in (record.get("binaries") or {}).get("files") or []:
        name = binary_name(entry.get("build_id"), entry.get("sha256"))
        if entry.get("stored") and (only is None or (name is not None and "/".join(name) in only)):
            entry.update(stored=False, reason=reason)


def set_binaries(record: dict, result: dict) -> None:
    record["binaries"] = result


def set_backtrace(record: dict, result: dict) -> None:
    record["backtrace"] = result


def set_signature(record: dict, result: dict) -> None:
    record["signature"] = result


def set_notify(record: dict, result: dict) -> None:
    """What the notification hook did (domain/notify.py): not a failure of the collection, whatever it says."""
    record["notify"] = result


def finish(record: dict, *, failed: bool, duration: float, peak_rss: int) -> None:
    """The final status and the collector's own figures."""
    record["status"] = "failed" if failed else "complete"
    record["collector"]["duration"] = round(duration, 6)
    record["collector"]["peak_rss"] = peak_rss


def dumps(record: dict) -> bytes:
    return json.dumps(record, indent=1, ensure_ascii=True).encode() + b"\n"


def load(data: bytes) -> dict:
    record = json.loads(data)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"not a corepipe record of schema {SCHEMA}")
    return record
