"""``corepipe prune --remote``: retention for a fleet's bucket (docs/shipping.md, "Retention in the bucket").

From the index (never a listing of the crashes): the crashes older than ``--max-age`` days that are not among the
``--keep-per-signature`` newest of their signature lose their objects (record first, so a half-deleted crash never
looks complete, then the core), then get a tombstone row each in the pruner's own partition (``node=_prune``:
the pruner never writes in a node's partition), then the ``.build-id`` objects that only they named are deleted.
A crash whose objects could not all be deleted gets no tombstone: the next run deletes what is left (a deletion of
an object already gone is no error).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from corepipe.domain import fleet, fleet_compact, fleet_index, fleet_sql
from corepipe.platform.objectstore import DestinationError


@dataclass
class Pruned:
    crashes: int = 0
    binaries: int = 0
    failed: int = 0


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
        for key in unused:
            say(f"would delete {key} (no remaining crash names it)")
        result.crashes, result.binaries = len(doomed), len(unused)
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
    for key in unused:
        try:
            destination.delete(key)
            result.binaries += 1
        except DestinationError as exc:
            result.failed += 1
            say(f"error: cannot delete {key}: {exc}")
    if result.binaries:
        say(f"deleted {result.binaries} saved binaries no remaining crash names")
    return result
