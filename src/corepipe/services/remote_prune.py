"""``corepipe prune --remote``: retention for a fleet's bucket (docs/shipping.md, "Retention in the bucket").

From the index (never a listing of the crashes): the crashes older than ``--max-age`` days that are not among the
``--keep-per-signature`` newest of their signature lose their objects (record first, so a half-deleted crash never
looks complete, then the core), then get a tombstone row each in the pruner's own partition (``node=_prune``:
the pruner never writes in a node's partition), then the ``.build-id`` objects that only they named are deleted.
A crash whose objects could not all be deleted gets no tombstone: the next run deletes what is left (a deletion of
an object already gone is no error).

Then the index itself (``sweep``): the objects of nodes' partitions whose crash rows are all tombstoned are deleted
(deleting hides nothing more: every row of theirs is hidden already), and last the pruner's tombstone objects of a
dump day, once none of that day's tombstones hides a row in any index object, as seen by two listings of this
workstation's pruner at least SETTLE apart (a node compacting its partition may write back rows of an object it
read before the pruner deleted it, within fleet_compact.LIMIT; the second listing sees that object, and the
tombstones stay). The time of the first listing of each day is kept in the index cache (``prune-clocks.json``;
safe to delete: the clocks start again).

A dry run (``preview``) says what the run would delete, the index clean-up included, counting the crashes it
would delete as tombstoned, and which days' tombstones wait for the hour; it deletes nothing and starts no clock.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from corepipe.domain import fleet, fleet_compact, fleet_index, fleet_sql
from corepipe.platform import fs
from corepipe.platform.objectstore import Destination, DestinationError

#: Seconds a day's tombstones must have hidden no row before they are deleted: far more than a compaction may
#: take (fleet_compact.LIMIT, plus its write within the SDKs' timeouts: 4 tries of at most 320 s each).
SETTLE = 3600
CLOCKS = "prune-clocks.json"


@dataclass
class Pruned:
    crashes: int = 0
    binaries: int = 0
    failed: int = 0
    index: int = 0
    tombstones: int = 0


def prune(remote: fleet.RemoteCatalog, max_age_days: Optional[float], keep: Optional[int], *, dry_run: bool,
          say: Callable[[str], None]) -> Pruned:
    """Delete (or with ``dry_run`` only list) what the retention says, one line per crash to ``say``."""
    now = time.time()
    before = None if max_age_days is None else now - max_age_days * 86400
    doomed, unused = fleet_sql.expired(remote.table(), before, keep)
    why = " and ".join(filter(None, [f"older than {max_age_days:g} days" if max_age_days is not None else "",
                                     f"not among the {keep} newest of its signature" if keep is not None else ""]))
    result = Pruned()
    if dry_run:
        for value in doomed:
            say(f"would delete {value['node']}/{value['id']} ({why})")
        result.crashes = len(doomed)
        preview(remote, doomed, result, say)
        for key in unused:
            say(f"would delete {key} (no remaining crash names it)")
        result.binaries = len(unused)
        return result
    destination = remote.destination

    def delete(value: dict) -> Optional[str]:
        keys = [value["keys"]["record"]["key"]] + ([value["keys"]["core"]["key"]] if value["keys"]["core"] else [])
        try:
            for key in keys:
                destination.delete(key)
        except DestinationError as exc:
            return str(exc)
        return None

    tombstones = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for value, error in zip(doomed, pool.map(delete, doomed)):
            if error:
                result.failed += 1
                say(f"error: cannot delete {value['node']}/{value['id']}: {error}")
                continue
            say(f"deleted {value['node']}/{value['id']} ({why})")
            tombstones.append(fleet_index.tombstone(value["node"], value["id"], value["timestamp"], now))
    result.crashes = len(tombstones)
    try:
        written = fleet.write_rows(destination, fleet_index.PRUNER, tombstones) if tombstones else []
        for day in sorted({fleet_index.partition(destination.location.prefix, key)[0] for key in written}):
            fleet_compact.compact(destination, fleet_index.PRUNER, day, remote.warn)
    except DestinationError as exc:  # the next run finds these crashes' objects gone and writes their tombstones
        result.failed += 1
        say(f"error: cannot write the tombstones of the crashes deleted: {exc}")
    if result.failed:  # a binary of a crash still there (not deleted) must stay
        return result
    sweep(remote, result, say)
    result.binaries = _delete(destination, unused, result, say)
    if result.binaries:
        say(f"deleted {result.binaries} saved binaries no remaining crash names")
    return result


def sweep(remote: fleet.RemoteCatalog, result: Pruned, say: Callable[[str], None]) -> None:
    """Delete the index objects that only hold pruned crashes' rows, then the tombstone objects of the days whose
    tombstones have hidden nothing for SETTLE seconds (the module's docstring says why this order and this wait)."""
    destination, cache = remote.destination, remote.index
    clocks = _clocks(cache.directory)
    started = time.time()
    objects = _census(remote, cache.sync(again=True))
    for day, clean in _days(objects).items():
        if not clean:
            clocks.pop(day, None)
    dead = _dead(objects)
    result.index = _delete(destination, dead, result, say)
    if result.index:
        say(f"deleted {result.index} index objects whose crashes are all pruned")
    if dead:  # the listing that counts: after the deletions
        started = time.time()
        objects = _census(remote, cache.sync(again=True))
    seen = time.time()
    if _unread(cache, say):  # its rows may be a pruned crash's: no day is known to be clean
        clocks = {}
    for day, clean in sorted(_days(objects).items()):
        if not clean or cache.unread:
            clocks.pop(day, None)
            continue
        since = clocks.setdefault(day, seen)
        if started - since < SETTLE:
            continue
        keys = _tombstone_objects(objects, day)
        deleted = _delete(destination, keys, result, say)
        result.tombstones += deleted
        if deleted == len(keys):
            del clocks[day]
    if result.tombstones:
        say(f"deleted {result.tombstones} tombstone objects that hide no crash any more")
    days = {value[0] for value in objects.values() if value[1] == fleet_index.PRUNER}
    _save_clocks(cache.directory, {day: since for day, since in clocks.items() if day in days})


def preview(remote: fleet.RemoteCatalog, doomed: list, result: Pruned, say: Callable[[str], None]) -> None:
    """What ``sweep`` would do after the tombstones of ``doomed`` (the crashes a run would delete): a ``would
    delete`` line per index object and per tombstone object it would delete, and a line per day whose tombstones
    hide no crash but wait for the hour. Deletes nothing and starts no clock: a dry run is not a listing that
    counts."""
    cache, now = remote.index, time.time()
    planned: dict = {}
    for value in doomed:
        key = fleet_index.object_key(remote.prefix, fleet_index.PRUNER, fleet_index.day(value), now)
        planned.setdefault(key, []).append((value["node"], value["id"]))
    manifest = cache.sync(again=True)
    objects = _census(remote, manifest, planned)
    first = _days(objects)  # a day not clean before the deletions starts its hour again (sweep's first loop)
    dead = _dead(objects)
    for key in dead:
        say(f"would delete {key} (an index object whose crashes are all pruned)")
    result.index = len(dead)
    if _unread(cache, say):
        return
    if dead:
        objects = _census(remote, {k: v for k, v in manifest.items() if k not in dead}, planned)
    clocks = _clocks(cache.directory)
    for day, clean in sorted(_days(objects).items()):
        if not clean:
            continue
        since = clocks.get(day) if first.get(day) else None
        keys = _tombstone_objects(objects, day)
        if since is None:
            say(f"tombstones of {day} kept: they hide no crash; a run (not --dry-run) starts their hour")
        elif now - since < SETTLE:
            say(f"tombstones of {day} kept: they hide no crash since {_utc(since)}; a run from "
                f"{_utc(since + SETTLE)} deletes their {len(keys)} objects")
        else:
            for key in keys:
                say(f"would delete {key} (tombstones that hide no crash any more)")
            result.tombstones += len(keys)


def _unread(cache: fleet.IndexCache, say: Callable[[str], None]) -> bool:
    """Whether the last sync left index objects unread (said once): then no day's tombstones count as clean."""
    if cache.unread:
        say(f"tombstones kept: {len(cache.unread)} index objects could not be read ({cache.unread[0]}, ...)")
    return bool(cache.unread)


def _tombstone_objects(objects: dict, day: str) -> list:
    """The keys of the pruner's tombstone objects of ``day``."""
    return [key for key, value in objects.items() if value[:2] == (day, fleet_index.PRUNER)]


def _utc(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _delete(destination: Destination, keys: list, result: Pruned, say: Callable[[str], None]) -> int:
    """Delete ``keys``; returns how many went (a failure is said, and counted in ``result.failed``)."""
    deleted = 0
    for key in keys:
        try:
            destination.delete(key)
            deleted += 1
        except DestinationError as exc:
            result.failed += 1
            say(f"error: cannot delete {key}: {exc}")
    return deleted


def _census(remote: fleet.RemoteCatalog, manifest: dict, planned: Optional[dict] = None) -> dict:
    """key -> (day, node, crashes, live, tombstones, needed) of every index object of ``manifest``, the cache's
    (from ``sync(again=True)``: an object that could not be read whole before is tried again, as a failed GET must
    not keep tombstones for ever), with the ``planned`` tombstone objects (fleet_sql.census)."""
    census = {}
    for key, *counts in fleet_sql.census(remote.index.directory, manifest, planned):
        where = fleet_index.partition(remote.prefix, key)
        if where is not None:
            census[key] = (*where, *counts)
    return census


def _dead(objects: dict) -> list:
    """The objects of nodes' partitions whose crash rows are all tombstoned (and that hold no tombstone)."""
    return [key for key, (_day, node, crashes, live, tombstones, _needed) in objects.items()
            if node != fleet_index.PRUNER and crashes and not live and not tombstones]


def _days(objects: dict) -> dict:
    """day -> whether the pruner's tombstones of that day are clean: each of its objects holds tombstones (one that
    holds none was not read whole) and none of them hides a crash row still in the index."""
    days: dict = {}
    for day, node, _crashes, _live, tombstones, needed in objects.values():
        if node == fleet_index.PRUNER:
            days[day] = days.get(day, True) and tombstones > 0 and not needed
    return days


def _clocks(directory: str) -> dict:
    """day -> when a listing first found its tombstones clean (and every listing since), from the cache."""
    try:
        with open(os.path.join(directory, CLOCKS), "rb") as f:
            value = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return {}
    days = value.get("days") if isinstance(value, dict) else None
    return {d: t for d, t in days.items() if isinstance(d, str) and isinstance(t, (int, float))} \
        if isinstance(days, dict) else {}


def _save_clocks(directory: str, clocks: dict) -> None:
    data = json.dumps({"days": clocks}).encode()
    fs.replace(os.path.join(directory, CLOCKS), lambda fd: fs.write_all(fd, data))
