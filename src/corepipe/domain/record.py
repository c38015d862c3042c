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
          redact_env: list) -> dict:
    """The record before the core is stored; ``core`` and ``collector`` are filled in as collection goes on."""
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
        "collector": {"version": __version__, "duration": None, "peak_rss": None, "errors": []},
    }


def dumps(record: dict) -> bytes:
    return json.dumps(record, indent=1, ensure_ascii=True).encode() + b"\n"


def load(data: bytes) -> dict:
    record = json.loads(data)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"not a corepipe record of schema {SCHEMA}")
    return record
