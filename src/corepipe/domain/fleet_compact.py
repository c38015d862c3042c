"""Compaction of the fleet index: one node's index objects of one day merged into one, so that a year of a large
fleet stays a manageable number of objects (docs/shipping.md, "Compaction").

Only the node that owns a partition compacts it (the shipper, for its own ``node=``; the pruner, for ``_prune``).
The compacted object's first row names the objects it replaces (``fleet_index.replaces``); a reader that has
read it whole leaves their rows out, so nothing is counted twice while they still exist. They are deleted only
after the compacted object is written and read back byte for byte. Rows are copied, never changed: a crash row
that a tombstone of the same partition names is dropped, the tombstone kept.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

from corepipe.domain import fleet, fleet_index
from corepipe.platform.objectstore import Destination, DestinationError

#: Objects in one partition of today that start a compaction (a partition of a past day: two). A sweep that ships
#: something adds one object, so a crash loop rewrites its day's rows once per COMPACT_AT sweeps, not every sweep.
COMPACT_AT = 8
#: Seconds a compaction may take from its listing to the write of the merged object: past it, it writes nothing
#: (tried again on the next sweep). ``prune --remote`` counts on it: rows the pruner's deletions removed come back
#: only in an object written within this time, plus its write's timeouts (remote_prune.SETTLE).
LIMIT = 600
#: Days the shipper keeps counting its objects of (a crash is shipped days after its dump at most, as a rule).
KEEP_DAYS = 30


def count(state: dict, url: str, written: list, prefix: str) -> dict:
    """day -> objects this node has in its partition of that day (as far as it knows), from the saved ``state``
    (``{destination, days}``; another destination's counts start afresh) and the index keys just ``written``."""
    days = state.get("days") if state.get("destination") == url and isinstance(state.get("days"), dict) else {}
    days = {d: n for d, n in days.items() if isinstance(n, int) and isinstance(d, str)}
    for key in written:
        where = fleet_index.partition(prefix, key)
        if where is not None:
            days[where[0]] = days.get(where[0], 0) + 1
    return days


def due(days: dict, now: float) -> list:
    """The days whose partition is to be compacted now: COMPACT_AT objects, or two of a day that is over."""
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    return sorted(d for d, n in days.items() if n >= COMPACT_AT or (d < today and n >= 2))


def settled(days: dict, now: float) -> dict:
    """``days`` without those over KEEP_DAYS old that are down to one object (the counts stay bounded; a crash of
    such a day shipped later makes it count one again, and the next one compacts it)."""
    oldest = time.strftime("%Y-%m-%d", time.gmtime(now - KEEP_DAYS * 86400))
    return {d: n for d, n in days.items() if d >= oldest or n >= 2}


def compact(destination: Destination, node: str, day: str, warn: Callable[[str], None]) -> Optional[str]:
    """Merge ``node``'s index objects of ``day`` into one new object and delete them; returns its key, or None
    when there was nothing to merge. An object that cannot be read whole is left as it is."""
    prefix = destination.location.prefix
    base = fleet_index.partition_root(prefix, node, day)
    started = time.time()
    listed = sorted((o for o in destination.list(base) if fleet_index.NAME.fullmatch(o.key[len(base):])),
                    key=lambda o: o.key)
    read = {}
    for obj in listed:
        if obj.size > fleet.MAX_INDEX_OBJECT:
            warn(f"{obj.key}: {obj.size} bytes, more than an index object may be; left out of the compaction")
            continue
        rows = fleet.read_object(destination, obj.key, obj.size, node, warn)
        if rows is not None:
            read[obj.key[len(base):]] = rows
    if len(read) < 2:
        return None
    replaced = {n for rows in read.values() for r in rows if r["kind"] == "replaces" for n in r["objects"]}
    crashes: dict = {}
    tombstones: dict = {}
    for name, rows in read.items():
        if name in replaced:
            continue  # its rows are in the object that replaces it (a compaction cut short before its deletions)
        for value in rows:
            if value["kind"] == "crash":
                crashes.setdefault((value["node"], value["id"]), value)  # the first by key, as readers keep
            elif value["kind"] == "tombstone":
                tombstones.setdefault((value["node"], value["id"]), value)
    rows = [fleet_index.replaces(list(read))]
    rows += [value for crash, value in sorted(crashes.items()) if crash not in tombstones]
    rows += [value for _crash, value in sorted(tombstones.items())]
    key = fleet_index.object_key(prefix, node, day, time.time())
    data = fleet_index.encode(rows)
    if not 0 <= time.time() - started <= LIMIT:
        raise DestinationError(f"reading {base} took more than {LIMIT} s; nothing merged, so that no row the pruner "
                               "removed meanwhile comes back")
    destination.put_small(key, data, {"rows": str(len(rows) - 1), "replaces": str(len(read))})
    back: list = []
    try:
        fleet.get_bounded(destination, {"key": key, "size": len(data)}, back.append)
        if b"".join(back) != data:
            raise DestinationError(f"{key} read back different from what was written")
    except DestinationError as exc:
        with contextlib.suppress(DestinationError):  # a reader would otherwise trust it over the objects it names
            destination.delete(key)
        raise DestinationError(f"{exc}; the objects it would replace are kept") from None
    for name in read:
        destination.delete(base + name)
    return key
