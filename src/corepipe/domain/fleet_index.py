"""The fleet index: one row per shipped crash, in immutable NDJSON objects under ``<prefix>/_index/v1/``, so
that a workstation reads a fleet's crashes with a few requests instead of one per crash (docs/shipping.md,
"The fleet index").

Objects: ``<prefix>/_index/v1/dt=YYYY-MM-DD/node=<node>/<time>-<random>.ndjson.gz``; the day is the crash's
dump day (UTC). A node writes only into its own ``node=`` partition and never rewrites an object; a crash
deleted from the bucket gets a tombstone row (``kind: "tombstone"``). Every row read back is checked here
(``check``): the bucket is written by every node, so a row is untrusted until it passes.
"""

from __future__ import annotations

import gzip
import json
import re
import secrets
import time
from typing import Optional

from corepipe import __version__
from corepipe.platform import digest
from corepipe.platform.store import BUILD_ID, CORE, CRASH_DIR, PARTIAL_CORE, RECORD, core_file

SCHEMA = 1
DIRECTORY = "_index/v1"
#: The partition of ``corepipe prune --remote``'s tombstones: not a node's name (those start with a letter or
#: digit), so no shipper writes there, and the pruner never writes in a node's partition.
PRUNER = "_prune"
NAME = re.compile(r"[0-9TZ.]{1,40}-[0-9a-z]{1,16}\.ndjson\.gz")
OBJECT = re.compile(r"dt=(\d{4}-\d{2}-\d{2})/node=([A-Za-z0-9][A-Za-z0-9._-]{0,62}|_prune)/(" + NAME.pattern + ")")
#: Bounds on what a row may claim (a record is at most 1 MiB when written; a core at most a few TiB).
MAX_RECORD = 64 << 20
MAX_CORE = 16 << 40
MAX_TEXT = 4096
MAX_BINARIES = 4096
MAX_LINE = 1 << 20
#: A compacted object replaces at most this many (a node writes far fewer objects a day).
MAX_REPLACED = 10000
_HEX = re.compile(r"[0-9a-f]{1,64}")
_ID = re.compile(r"[0-9a-f]{12}")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_CONTAINER = ("runtime", "id", "name", "image", "pod_name", "pod_namespace", "pod_uid", "confidence")
_CORE = ("stored", "file", "size", "compressed_size", "truncated", "complete", "digest")
_SIGNATURE = ("hash", "text", "algorithm", "version", "source", "site")
#: The Azure Batch task of a crash (``list --remote --job/--task`` filter on it): keep these names.
BATCH = ("pool", "job", "task", "node", "confirmed", "source")


class BadRow(ValueError):
    """A row that is not what this schema allows; the message says which field."""


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def root(prefix: str) -> str:
    """The key prefix every index object of ``prefix`` starts with."""
    return _join(prefix, DIRECTORY) + "/"


def object_key(prefix: str, node: str, day: str, now: float) -> str:
    """A new, never reused key in ``node``'s partition of ``day`` (the random part keeps two writers apart)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1000000:06d}Z"
    return _join(prefix, DIRECTORY, f"dt={day}", f"node={node}", f"{stamp}-{secrets.token_hex(4)}.ndjson.gz")


def partition(prefix: str, key: str) -> Optional[tuple]:
    """(day, node) of an index object's key; None for a key this schema does not name."""
    match = OBJECT.fullmatch(key[len(root(prefix)):]) if key.startswith(root(prefix)) else None
    return (match.group(1), match.group(2)) if match else None


def partition_root(prefix: str, node: str, day: str) -> str:
    """The key prefix of ``node``'s index objects of ``day``."""
    return f"{root(prefix)}dt={day}/node={node}/"


def replaces(names: list) -> dict:
    """The first row of a compacted object: the objects of its partition (by name) whose rows it holds. A reader
    that has read the compacted object whole drops those objects' rows, so a crash is never counted twice while
    they still exist (fleet_compact deletes them only after the compacted object is read back)."""
    return {"v": SCHEMA, "kind": "replaces", "objects": sorted(names)}


def tombstone(node: str, crash: str, timestamp: Optional[float], deleted: float) -> dict:
    """The row that says ``node``'s crash ``crash`` was deleted from the bucket (rows are never rewritten)."""
    return {"v": SCHEMA, "kind": "tombstone", "id": crash, "node": node, "timestamp": timestamp,
            "deleted": deleted, "corepipe": __version__}


def day(row: dict) -> str:
    stamp = row.get("timestamp")
    return time.strftime("%Y-%m-%d", time.gmtime(stamp if isinstance(stamp, (int, float)) else 0))


def core_state(rec: dict) -> str:
    """present, truncated, partial (the dump was cut short), none (not stored) or collecting, from the record
    alone (a local command also checks the file is still there)."""
    if rec.get("status") == "collecting":
        return "collecting"
    core = rec.get("core") or {}
    name = core_file(rec)
    if not core.get("stored") or name is None:
        return "none"
    if name == PARTIAL_CORE:
        return "partial"
    return "truncated" if core.get("truncated") else "present"


def digest_text(core: dict) -> Optional[str]:
    """The record's digest of its core as ``<algorithm>:<hex>`` (the core object's ``digest`` metadata too)."""
    stated = digest.stated(core)
    return f"{stated[0]}:{stated[1]}" if stated else None


def _pick(value: object, names: tuple) -> Optional[dict]:
    return {k: value.get(k) for k in names} if isinstance(value, dict) else None


def row(rec: dict, node: str, prefix: str, relative: tuple, objects: dict, withheld: bool = False) -> dict:
    """The index row of a shipped crash: ``relative`` is its directory below the store, ``objects`` the
    key -> size of what was uploaded for it (shipped.json); ``withheld``: its core was kept on the node (the
    signature's fleet-wide core budget was spent), core_state ``withheld``."""
    directory = _join(prefix, node, *relative)
    name = core_file(rec) if (rec.get("core") or {}).get("stored") else None
    core_key = f"{directory}/{name}" if name and f"{directory}/{name}" in objects else None
    listed = rec if core_key or not name else {**rec, "core": {**rec["core"], "stored": False}}
    binaries = _join(prefix, BUILD_ID) + "/"
    return {
        "v": SCHEMA, "kind": "crash", "id": rec.get("id"), "node": node,
        "time": rec.get("time"), "timestamp": rec.get("timestamp"), "received": rec.get("received"),
        "status": rec.get("status"), "pid": rec.get("pid"), "uid": rec.get("uid"),
        "exe": rec.get("exe"), "comm": rec.get("comm"), "hostname": rec.get("hostname"),
        "signal": _pick(rec.get("signal"), ("number", "name")),
        "container": _pick(rec.get("container") or {}, _CONTAINER),
        "signature": _pick(rec.get("signature"), _SIGNATURE),
        "core": {**_pick(listed.get("core") or {}, _CORE), "digest": digest_text(listed.get("core") or {})},
        "core_state": "withheld" if withheld else core_state(listed),
        "batch": _pick(rec.get("batch"), BATCH),
        "keys": {"record": {"key": f"{directory}/{RECORD}", "size": objects.get(f"{directory}/{RECORD}")},
                 "core": {"key": core_key, "size": objects[core_key]} if core_key else None,
                 "binaries": [{"key": k, "size": objects[k]} for k in sorted(objects) if k.startswith(binaries)]},
        "corepipe": __version__,
    }


def encode(rows: list) -> bytes:
    lines = b"".join(json.dumps(r, separators=(",", ":"), sort_keys=True).encode() + b"\n" for r in rows)
    return gzip.compress(lines, compresslevel=6, mtime=0)


# -- reading: every row is checked before anything uses it ------------------------------------------------


def _text(value: object, where: str, limit: int = MAX_TEXT) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(f"{where} is a {type(value).__name__}, not text")
    if len(value) > limit:
        raise BadRow(f"{where} is {len(value)} characters long (at most {limit})")
    return value


def _number(value: object, where: str, low: float = 0, high: float = 1 << 62) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRow(f"{where} is {str(value)[:40]!r}, not a number in [{low}, {high}]")
    return value


def _flag(value: object, where: str) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise BadRow(f"{where} is {str(value)[:40]!r}, not true or false")
    return value


def _section(value: object, where: str, fields: dict) -> Optional[dict]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRow(f"{where} is a {type(value).__name__}, not an object")
    return {name: check_value(value.get(name), f"{where}.{name}") for name, check_value in fields.items()}


def _key(value: object, where: str, start: str, names: tuple, limit: int) -> Optional[dict]:
    """{key, size} whose key is ``start`` + one of ``names`` (any name when empty), size within ``limit``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("key"), str):
        raise BadRow(f"{where} is not {{key, size}}")
    key = value["key"]
    rest = key[len(start):] if key.startswith(start) else None
    if rest is None or (names and rest not in names) or any(p in ("", ".", "..") for p in key.split("/")):
        raise BadRow(f"{where} {key[:120]!r} is outside its crash's place ({start}...)")
    size = _number(value.get("size"), f"{where}.size", 0, limit)
    if size is None:
        raise BadRow(f"{where}.size is missing")
    return {"key": key, "size": int(size)}


def check(value: object, prefix: str, node: str) -> dict:
    """The row as this schema defines it (unknown fields dropped), or BadRow; ``node`` is the partition the row
    was read from: a row about another node's crash, or naming a key outside its crash's place, is refused."""
    if not isinstance(value, dict):
        raise BadRow(f"a {type(value).__name__}, not an object")
    if value.get("v") != SCHEMA:
        raise BadRow(f"schema version {str(value.get('v'))[:20]!r}, not {SCHEMA}")
    kind = value.get("kind")
    if kind == "replaces":  # names only objects of the partition it is in: a node compacts only its own
        names = value.get("objects")
        if not isinstance(names, list) or len(names) > MAX_REPLACED or \
                not all(isinstance(n, str) and NAME.fullmatch(n) for n in names):
            raise BadRow(f"objects is not a list of at most {MAX_REPLACED} index object names of its partition")
        return {"v": SCHEMA, "kind": kind, "objects": names}
    crash = value.get("id")
    if not isinstance(crash, str) or not _ID.fullmatch(crash):
        raise BadRow(f"id {str(crash)[:40]!r} is not a crash id")
    claimed = value.get("node")
    if node == PRUNER and kind != "tombstone":
        raise BadRow(f"crash {crash}: a {str(kind)[:20]!r} row in the pruner's partition, which holds tombstones")
    if node == PRUNER and not (isinstance(claimed, str) and _NODE.fullmatch(claimed)):
        raise BadRow(f"tombstone of crash {crash} names no node ({str(claimed)[:70]!r})")
    if node != PRUNER and claimed != node:
        raise BadRow(f"crash {crash} claims node {str(claimed)[:70]!r} but is in node={node}'s partition")
    node = claimed
    if kind == "tombstone":
        return {"v": SCHEMA, "kind": kind, "id": crash, "node": node,
                "timestamp": _number(value.get("timestamp"), "timestamp"),
                "deleted": _number(value.get("deleted"), "deleted"),
                "corepipe": _text(value.get("corepipe"), "corepipe", 64)}
    if kind != "crash":
        raise BadRow(f"kind {str(kind)[:20]!r} is neither crash nor tombstone")
    text = _text
    signal_fields = {"number": lambda v, w: _number(v, w, 0, 1024), "name": lambda v, w: text(v, w, 32)}
    keys = value.get("keys")
    if not isinstance(keys, dict):
        raise BadRow("keys is missing")
    record = _key(keys.get("record"), "keys.record", _join(prefix, node) + "/", (), MAX_RECORD)
    directory = record["key"][:-len(RECORD) - 1] if record and record["key"].endswith("/" + RECORD) else ""
    match = CRASH_DIR.fullmatch(directory.rsplit("/", 1)[-1])
    if not match or match.group(2) != crash:
        raise BadRow(f"keys.record {record and record['key'][:120]!r} is not crash {crash}'s record")
    binaries = keys.get("binaries") or []
    if not isinstance(binaries, list) or len(binaries) > MAX_BINARIES:
        raise BadRow(f"keys.binaries is not a list of at most {MAX_BINARIES}")
    checked = {
        "v": SCHEMA, "kind": kind, "id": crash, "node": node,
        "time": text(value.get("time"), "time", 40), "timestamp": _number(value.get("timestamp"), "timestamp"),
        "received": _number(value.get("received"), "received"), "status": text(value.get("status"), "status", 40),
        "pid": _number(value.get("pid"), "pid", 0, 1 << 32), "uid": _number(value.get("uid"), "uid", 0, 1 << 32),
        "exe": text(value.get("exe"), "exe"), "comm": text(value.get("comm"), "comm", 256),
        "hostname": text(value.get("hostname"), "hostname", 256),
        "signal": _section(value.get("signal"), "signal", signal_fields),
        "container": _section(value.get("container"), "container", {k: text for k in _CONTAINER}) or {},
        "signature": _section(value.get("signature"), "signature", {
            "hash": lambda v, w: _hex(v, w), "text": text, "algorithm": lambda v, w: text(v, w, 64),
            "version": lambda v, w: _number(v, w, 0, 1 << 31), "source": lambda v, w: text(v, w, 64),
            "site": lambda v, w: text(v, w, 256)}),
        "core": _section(value.get("core"), "core", {
            "stored": _flag, "file": lambda v, w: text(v, w, 64), "size": lambda v, w: _number(v, w, 0, MAX_CORE),
            "compressed_size": lambda v, w: _number(v, w, 0, MAX_CORE), "truncated": _flag, "complete": _flag,
            "digest": lambda v, w: text(v, w, 200)}) or {},
        "core_state": text(value.get("core_state"), "core_state", 20),
        "batch": _section(value.get("batch"), "batch", {
            "pool": text, "job": text, "task": text, "node": text, "confirmed": _flag,
            "source": lambda v, w: text(v, w, 64)}),
        "keys": {"record": record,
                 "core": _key(keys.get("core"), "keys.core", directory + "/", (CORE, PARTIAL_CORE), MAX_CORE),
                 "binaries": [_key(b, "keys.binaries[]", _join(prefix, BUILD_ID) + "/", (), MAX_CORE)
                              for b in binaries]},
        "corepipe": text(value.get("corepipe"), "corepipe", 64),
    }
    if checked["core"].get("stored") and checked["keys"]["core"] is None:
        raise BadRow("core.stored is true but keys.core names no object")
    return checked


def _hex(value: object, where: str) -> Optional[str]:
    text = _text(value, where, 64)
    if text is not None and not _HEX.fullmatch(text):
        raise BadRow(f"{where} {text[:40]!r} is not hex")
    return text
