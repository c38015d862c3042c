"""The store's usage ledger: what admission reads instead of scanning the store.

Admission (accounting.py) applies the limits to what the store holds; scanning every crash
directory for that made each stored core cost time in proportion to the store (1.5 s with 20k
crashes). The ledger is kept exact instead, under the store lock, by the only code that adds a core
(services/collect.py's commit), registers binaries or deletes (books.Books), in two parts:

- ``<store>/.ledger.json``: per container group its number and bytes of stored cores, per saved
  binary (``.build-id``) its bytes and how many stored cores use it, and per group the number and
  bytes of its crashes' records (which stay when their cores go, and have a budget of their own,
  ``records_max_use``); small (groups and binaries, not crashes), read by every admission;
- ``<group>/.cores.json``: that group's stored cores (file, bytes, time, binaries used), read only
  when a decision needs them (the new core's own group for the per-container limits, the biggest
  group while the global limits are over).

A group file that disagrees with the summary (a handler killed between the two writes) or a summary
that is missing or unreadable means a rebuild from a scan (books.rebuild_ledger); ``corepipe prune``
rebuilds it every time. A saved binary goes when the last core using it goes. A record counts with
the size it had when its crash was finished (later rewrites, such as a deletion's reason, change it
by a few bytes; prune's rebuild makes it exact again).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from corepipe.domain import policy

SCHEMA = 4


class Inconsistent(Exception):
    """A group's file disagrees with the summary: rebuild the ledger."""

    def __init__(self, group: str, message: str):
        super().__init__(f"{group}: {message}")
        self.group = group


class Ledger:
    """The ledger in memory; ``load_group`` reads a group's file (None when it has none)."""

    def __init__(self, groups: Optional[dict] = None, binaries: Optional[dict] = None,
                 load_group: Optional[Callable[[str], Optional[dict]]] = None, records: Optional[dict] = None):
        #: group -> [number of stored cores, their bytes on disk]
        self.totals: dict = groups if groups is not None else {}
        #: "xx/name" below .build-id -> [bytes on disk, number of stored cores using it]
        self.binaries: dict = binaries if binaries is not None else {}
        #: group -> [number of records, their bytes on disk], of every crash in the store
        self.records: dict = records if records is not None else {}
        self._load = load_group
        #: group -> {crash directory name: [core file name, bytes on disk, time stored, [binary keys]]}
        self._cores: dict = {}
        #: Groups whose file must be written; ``changed``: the summary must be (records counted).
        self.dirty: set = set()
        self.changed = False

    # -- reading (policy.Holdings) ----------------------------------------------------------------------

    def groups(self) -> dict:
        return {g: list(total) for g, total in self.totals.items() if total[0]}

    def group(self, group: str) -> dict:
        """The group's cores, loaded from its file the first time (checked against the summary)."""
        if group not in self._cores:
            loaded = (self._load(group) if self._load is not None else None) or {}
            count, size = self.totals.get(group, [0, 0])
            if len(loaded) != count or sum(entry[1] for entry in loaded.values()) != size:
                raise Inconsistent(group, f"{len(loaded)} cores in its file, {count} in the summary")
            self._cores[group] = loaded
        return self._cores[group]

    def cores(self, group: str) -> list:
        return [policy.Core(group=group, crash=crash, size=size, time=when, file=file, binaries=tuple(used))
                for crash, (file, size, when, used) in self.group(group).items()]

    # -- changes ----------------------------------------------------------------------------------------

    def add_core(self, group: str, crash: str, file: str, size: int, when: float) -> list:
        """A core is stored; returns the binary keys nothing uses any more (when it replaced an entry)."""
        unused = self.remove(group, crash)
        self.group(group)[crash] = [file, size, when, []]
        total = self.totals.setdefault(group, [0, 0])
        total[0] += 1
        total[1] += size
        self.dirty.add(group)
        return unused

    def add_binaries(self, group: str, crash: str, items: list) -> bool:
        """The crash's stored core uses the binaries ``items`` ((key, bytes) each); False when the crash has no
        core here (deleted meanwhile), so nothing uses them."""
        entry = self.group(group).get(crash)
        if entry is None:
            return False
        for name, size in items:
            if name in entry[3]:
                continue
            entry[3].append(name)
            self.binaries.setdefault(name, [size, 0])[1] += 1
        self.dirty.add(group)
        return True

    def add_record(self, group: str, size: int) -> None:
        """A crash's (final) record of ``size`` bytes on disk is in ``group``."""
        total = self.records.setdefault(group, [0, 0])
        total[0] += 1
        total[1] += size
        self.changed = True

    def remove_record(self, group: str, size: int) -> None:
        """A crash's record of ``size`` bytes went with its directory."""
        count, used = self.records.get(group, [0, 0])
        if count <= 1:
            self.records.pop(group, None)
        else:
            self.records[group] = [count - 1, max(0, used - size)]
        self.changed = True

    def group_records(self, group: str) -> list:
        """[number of records, their bytes on disk] of ``group``."""
        return list(self.records.get(group, [0, 0]))

    def remove(self, group: str, crash: str) -> list:
        """Forget a crash's core; returns the binary keys nothing uses any more (forgotten too)."""
        entry = self.group(group).pop(crash, None)
        if entry is None:
            return []
        total = self.totals[group]
        total[0] -= 1
        total[1] -= entry[1]
        if not total[0]:
            del self.totals[group]
        self.dirty.add(group)
        unused = []
        for name in entry[3]:
            counted = self.binaries.get(name)
            if counted is None:
                continue
            counted[1] -= 1
            if counted[1] <= 0:
                del self.binaries[name]
                unused.append(name)
        return unused

    # -- the files --------------------------------------------------------------------------------------

    def dumps(self) -> bytes:
        return json.dumps({"schema": SCHEMA, "groups": self.totals, "binaries": self.binaries,
                           "records": self.records},
                          separators=(",", ":")).encode()

    def group_dumps(self, group: str) -> Optional[bytes]:
        """The group's file, or None when it has no stored core (the file then goes)."""
        cores = self._cores.get(group) or {}
        return json.dumps(cores, separators=(",", ":")).encode() if cores else None


def loads(data: bytes, load_group: Optional[Callable[[str], Optional[dict]]] = None) -> Optional[Ledger]:
    """The ledger summary in ``data``; None when it is not one of this schema or has the wrong shape."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        return None
    groups, binaries, counted = raw.get("groups"), raw.get("binaries"), raw.get("records")
    if not (isinstance(groups, dict) and isinstance(binaries, dict) and isinstance(counted, dict)
            and all(_pair(v) for table in (groups, binaries, counted) for v in table.values())):
        return None
    return Ledger(groups, binaries, load_group, counted)


def group_loads(data: bytes) -> Optional[dict]:
    """A group file's cores; None when it has the wrong shape."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    for entry in raw.values():
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and _number(entry[1])
                and _number(entry[2]) and isinstance(entry[3], list) and all(isinstance(n, str) for n in entry[3])):
            return None
    return raw


def _pair(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and _number(value[0]) and _number(value[1])


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
