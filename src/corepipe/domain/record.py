"""The JSON record filed beside each core: a documented, versioned schema (see README, "Record")."""

from __future__ import annotations

import fnmatch
import json
import re
import signal as signals
import time
from collections.abc import Sequence
from typing import Callable, Optional

from corepipe import __version__
from corepipe.domain import batch
from corepipe.domain.containers import Container
from corepipe.domain.snapshot import Snapshot
from corepipe.platform.config import ENV_KEEP, REDACT_ARGS, Config
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import binary_name

#: 2 added ``batch``; a schema only ever adds keys, so every earlier one still loads.
SCHEMA = 2
SCHEMAS = (1, 2)
REDACTED = "<redacted>"
#: Bounds of a record (README, "Record"): each text field, paths, status lines, and the whole file.
FIELD_MAX = Config.record_field_max
PATH_MAX = 4096
MAX_STATUS_KEYS = 128
MAX_ITEMS = 4096  # arguments or environment variables looked at
MAX_SIZE = 1 << 20
_DROP_ORDER = ("process.maps", "process.mountinfo", "process.environ", "process.limits", "cgroup", "cmdline",
               "binaries.files", "backtrace.text", "process.status", "container.details", "collector.errors")


def signal_name(number: Optional[int]) -> Optional[str]:
    try:
        return signals.Signals(number).name if number is not None else None
    except ValueError:
        return None


def redact(environ: list, patterns: list, keep: Sequence[str] = ("*",), words: Sequence[str] = ()) -> list:
    """The environment with every value redacted except those of variables named in ``keep`` whose name has
    none of ``patterns``; the kept values are masked like arguments (``mask``); names are kept."""
    upper = [p.upper() for p in patterns]
    result = []
    for entry in environ:
        name, sep, value = entry.partition("=")
        if not sep:
            result.append(entry)
        elif any(p in name.upper() for p in upper) or not any(fnmatch.fnmatchcase(name, k) for k in keep):
            result.append(f"{name}={REDACTED}")
        else:
            result.append(f"{name}={mask(value, words)}")
    return result


# Every repetition that can start a match is bounded and anchored at the start of a word, so that masking
# stays linear on a megabyte of hostile text (an unbounded name part made it quadratic: minutes for 64 KiB).
_URL_USERINFO = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]{0,31}://)[^/?#@\s]{0,1024}@")
_TOKEN = re.compile(r"(?<![\w-])(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|xox[abprs]-[\w-]{10,}"
                    r"|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|glpat-[\w-]{20,}|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,})")
_BEARER = re.compile(r"(?i)(?<!\w)(bearer|basic)\s{1,8}[\w.~+/=-]{8,}")
_PAIR = re.compile(r"(?<![A-Za-z0-9_.-])([A-Za-z0-9_.-]{1,128})(\s{0,8}[=:]\s{0,8})([^\s&;,]+)")


def _secret_name(name: str, words: Sequence[str]) -> bool:
    parts = re.split(r"[-_.]+", name.lower().lstrip("-"))
    return any(part in words for part in parts) or any(len(w) > 4 and w in name.lower() for w in words)


def mask(text: str, words: Sequence[str]) -> str:
    """``text`` with credential-looking values replaced: URL userinfo, ``name=value`` / ``name: value`` where
    the name has one of ``words``, bearer and well-known token shapes. Nothing when ``words`` is empty."""
    if not words:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}" if _secret_name(m.group(1), words)
                     else m.group(0), text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _TOKEN.sub(REDACTED, text)


def mask_args(argv: list, words: Sequence[str]) -> list:
    """The command line with ``mask`` applied to each argument, and the argument after an option that names a
    secret (``--password hunter2``, ``-p`` is left alone: too short to tell) replaced."""
    result: list = []
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if (words and previous.startswith("--") and "=" not in previous and len(previous) > 2
                and _secret_name(previous, words) and not arg.startswith("-")):
            result.append(REDACTED)
        else:
            result.append(mask(arg, words))
    return result


def cut(text: Optional[str], limit: int, where: str, truncated: list) -> Optional[str]:
    """``text`` cut so that its JSON form (escapes included) is at most ``limit`` bytes; a cut is listed in
    ``truncated`` as ``where``."""
    if text is None:
        return None
    encoded = json.dumps(text, ensure_ascii=True)[1:-1]
    if len(encoded) <= limit:
        return text
    truncated.append(where)
    for end in range(limit, max(limit - 12, -1), -1):  # never split an escape sequence
        try:
            return json.loads(f'"{encoded[:end]}"')
        except ValueError:
            continue
    return ""


def _bounded_list(items: list, limit: int, where: str, truncated: list) -> list:
    """At most ``limit`` bytes of strings in all (each also cut at ``limit``)."""
    result, used = [], 0
    for i, item in enumerate(items):
        if used >= limit:
            truncated.append(f"{where}[{i}:]")
            break
        value = cut(item, limit - used, f"{where}[{i}]", truncated)
        result.append(value)
        used += len(json.dumps(value)) + 2
    return result


def _masked_list(items: list, masking: Callable[[list], list], limit: int, where: str, truncated: list) -> list:
    """``items`` masked, then bounded. Masking sees at most MAX_ITEMS items of at most ``limit`` characters each
    (a longer one is cut by the bound anyway), so hostile megabytes cost it little; an environment is redacted
    by name before the bound, so the variables whose values go take little room."""
    if len(items) > MAX_ITEMS:
        truncated.append(f"{where}[{MAX_ITEMS}:]")
    return _bounded_list(masking([item[:limit + 1] for item in items[:MAX_ITEMS]]), limit, where, truncated)


def omit_details(rec: dict, why: str) -> None:
    """Drop what only helps with a core (maps, mountinfo, limits, environment): keeps a crash whose core is not
    kept (rate limited, no room) cheap."""
    process = rec.get("process") or {}
    for key in ("maps", "mountinfo", "limits", "environ"):
        if process.get(key):
            process[key] = [] if key == "environ" else None
            rec.setdefault("truncated", []).append(f"process.{key} (omitted: {why})")


#: A record without a core (refused, rate limited, no room, REJECTed by the server) takes at most this many
#: bytes: a flood of crashes must cost the store little (docs/hardening.md). Its texts are cut at CORELESS_TEXT
#: bytes and its lists at CORELESS_ITEMS items.
CORELESS_MAX = 8 << 10
CORELESS_TEXT = 256
CORELESS_ITEMS = 16


def coreless(rec: dict, why: str) -> bytes:
    """Make the record of a crash without a core small, and return its file (at most CORELESS_MAX bytes): no
    maps, mountinfo, limits, environment or ``binaries.files``, every text and list cut short (listed once in
    ``truncated``)."""
    omit_details(rec, why)
    files = (rec.get("binaries") or {}).get("files") if isinstance(rec.get("binaries"), dict) else None
    if files:
        rec["binaries"]["files"] = []
        rec.setdefault("truncated", []).append(f"binaries.files (omitted: {why})")
    cuts: list = []
    for key in [k for k in rec if k != "truncated"]:
        rec[key] = _small(rec[key], key, cuts)
    truncated = _small(rec.get("truncated") or [], "truncated", cuts)
    if cuts:
        truncated.append(f"{len(cuts)} texts and lists cut short, such as {cuts[0]} (omitted: {why})")
    rec["truncated"] = truncated
    return dumps(rec, CORELESS_MAX)


def _small(value: object, where: str, cuts: list) -> object:
    """``value`` with every text cut at CORELESS_TEXT bytes, every list at CORELESS_ITEMS items, every mapping at
    4 * CORELESS_ITEMS keys; where something was cut goes to ``cuts``."""
    if isinstance(value, str):
        return cut(value, CORELESS_TEXT, where, cuts)
    if isinstance(value, list):
        if len(value) > CORELESS_ITEMS:
            cuts.append(f"{where}[{CORELESS_ITEMS}:]")
        return [_small(v, f"{where}[{i}]", cuts) for i, v in enumerate(value[:CORELESS_ITEMS])]
    if isinstance(value, dict):
        if len(value) > 4 * CORELESS_ITEMS:
            cuts.append(f"{where} (keys after {4 * CORELESS_ITEMS})")
        return {k: _small(v, f"{where}.{k}", cuts) for k, v in list(value.items())[:4 * CORELESS_ITEMS]}
    return value


def build(*, crash_id: str, args: KernelArgs, snapshot: Optional[Snapshot], container: Container,
          redact_env: list, errors: tuple = (), received: Optional[float] = None, env_keep: Sequence[str] = ENV_KEEP,
          redact_args: Sequence[str] = REDACT_ARGS, field_max: int = FIELD_MAX, transport: str = "pipe") -> dict:
    """The record before the core is stored (``errors``: the collection's so far); ``core`` and ``collector``
    are filled in as collection goes on, through the functions below. Every text from the crashed process is
    bounded (``field_max``) and cuts are listed in ``truncated``. ``transport``: how the core came (the
    kernel's pipe to the handler, "pipe"; the coredump socket, "socket"; a handler's handoff to the server,
    "forwarded")."""
    snap = snapshot
    truncated: list = []

    def text(value: Optional[str], where: str, limit: int = field_max) -> Optional[str]:
        return cut(value, limit, where, truncated)

    status = {key: text(value, f"process.status.{key}", 4096)
              for key, value in list((snap.status() if snap else {}).items())[:MAX_STATUS_KEYS]}
    words = [w.lower() for w in redact_args]
    when = args.time if args.time is not None else int(time.time())
    return {
        "schema": SCHEMA,
        "id": crash_id,
        "status": "collecting",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
        "timestamp": when,
        "received": round(received if received is not None else time.time(), 6),
        "pid": args.pid,
        "ns_pid": args.ns_pid,
        "tid": args.tid,
        "uid": args.uid,
        "gid": args.gid,
        "signal": {"number": args.signal, "name": signal_name(args.signal)},
        "comm": text(args.comm, "comm", 256),
        "exe": text(snap.exe if snap else None, "exe", PATH_MAX),
        "cmdline": _masked_list(snap.cmdline() if snap else [], lambda argv: mask_args(argv, words), field_max,
                                "cmdline", truncated),
        "cwd": text(snap.cwd if snap else None, "cwd", PATH_MAX),
        "hostname": text(args.hostname, "hostname", 256),
        "dump_mode": args.dump_mode,
        "core_limit": args.core_limit,
        "container": container.to_dict(),
        "batch": batch.of_crash(container.batch, container.confidence == "certain", container.runtime,
                                snap.environ() if snap is not None and snap.trusted else []),
        "cgroup": text(snap.text("cgroup") if snap else None, "cgroup"),
        "process": {
            "comm": text(snap.text("comm").rstrip("\n") if snap else None, "process.comm", 256),
            "root": text(snap.root if snap else None, "process.root", PATH_MAX),
            "status": status,
            "limits": text(snap.text("limits") if snap else None, "process.limits"),
            "environ": _masked_list(snap.environ() if snap else [],
                                    lambda env: redact(env, redact_env, env_keep, words), field_max,
                                    "process.environ", truncated),
            "maps": text(snap.text("maps") if snap else None, "process.maps"),
            "mountinfo": text(snap.text("mountinfo") if snap else None, "process.mountinfo"),
            "pidfd": snap.pidfd if snap else "absent",
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
        "collector": {"version": __version__, "duration": None, "cpu": None, "peak_rss": None,
                      "errors": list(errors), "transport": transport},
        "truncated": truncated,
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


def finish(record: dict, *, failed: bool, duration: float, cpu: float, peak_rss: int) -> None:
    """The final status and the collector's own figures."""
    record["status"] = "failed" if failed else "complete"
    record["collector"]["duration"] = round(duration, 6)
    record["collector"]["cpu"] = round(cpu, 6)
    record["collector"]["peak_rss"] = peak_rss


def dumps(record: dict, max_size: int = MAX_SIZE) -> bytes:
    """The record's file; over ``max_size`` bytes the bulkiest fields are dropped (and listed in ``truncated``)
    until it fits, the collector's errors last."""
    data = json.dumps(record, indent=1, ensure_ascii=True).encode() + b"\n"
    for path in _DROP_ORDER:
        if len(data) <= max_size:
            break
        parent = record
        *parents, key = path.split(".")
        for name in parents:
            parent = parent.get(name) if isinstance(parent, dict) else None  # type: ignore[assignment]
        if isinstance(parent, dict) and parent.get(key):
            parent[key] = [] if isinstance(parent[key], list) else None
            record.setdefault("truncated", []).append(f"{path} (omitted: the record was over {max_size} bytes)")
            data = json.dumps(record, indent=1, ensure_ascii=True).encode() + b"\n"
    return data


_NUMBER = (int, float)
_TEXTS = [str]
#: The type of every field a command reads from a record, for a record written elsewhere (any fleet node's):
#: None is allowed anywhere, unknown fields are not read; a dict is an object of these fields, a list a list of
#: its one element's type.
SHAPE: dict = {
    "id": str, "status": str, "time": str, "timestamp": _NUMBER, "received": _NUMBER, "pid": int, "ns_pid": int,
    "tid": int, "uid": int, "gid": int, "signal": {"number": int, "name": str}, "comm": str, "exe": str,
    "cmdline": _TEXTS, "cwd": str, "hostname": str, "dump_mode": int, "core_limit": int, "cgroup": str,
    "node": str, "container": {k: str for k in ("runtime", "id", "name", "image", "pod_name", "pod_namespace",
                                                  "pod_uid", "cgroup", "source", "confidence")},
    "batch": {k: str for k in ("pool", "job", "task", "node", "source")},
    "process": {"trusted": bool, "untrusted_reasons": _TEXTS},
    "core": {"file": str, "stored": bool, "reason": str, "size": int, "compressed_size": int, "sha256": str,
             "digest": {"algorithm": str, "value": str}, "truncated": bool, "complete": bool},
    "collector": {"version": str, "duration": _NUMBER, "errors": list},
    "postmortem": {"skipped": str},
    "binaries": {"files": [{"path": str, "stored": bool, "size": int, "sha256": str, "build_id": str,
                            "reason": str}], "errors": list},
    "backtrace": {"tool": str, "duration": _NUMBER, "truncated": bool, "error": str, "text": str},
    "signature": {"hash": str, "text": str, "algorithm": str, "version": int, "source": str, "site": str},
}


def wrong_type(value: object, shape: object = SHAPE, where: str = "record") -> Optional[str]:
    """The first field of ``value`` whose type is not ``shape``'s, said in a few words; None if every one fits."""
    if value is None:
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is a {type(value).__name__}, not an object"
        return next((found for name, inner in shape.items()
                     if (found := wrong_type(value.get(name), inner, f"{where}.{name}"))), None)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is a {type(value).__name__}, not a list"
        return next((found for item in value if (found := wrong_type(item, shape[0], f"{where}[]"))), None)
    if isinstance(value, bool) and shape is not bool or not isinstance(value, shape):  # type: ignore[arg-type]
        return f"{where} is a {type(value).__name__}, not {getattr(shape, '__name__', 'a number')}"
    return None


def load(data: bytes) -> dict:
    record = json.loads(data)
    schema = record.get("schema") if isinstance(record, dict) else None
    if type(schema) is not int or schema not in SCHEMAS:
        raise ValueError(f"not a corepipe record of schema {' or '.join(map(str, SCHEMAS))}")
    return record
