"""The store's state file (``<store>/.state.json``) as types: what handlers remember between crashes.

Read and written only through ``books.Books`` (under the store lock). It holds:

- ``rate``: a rate-limit key -> the times of the events it let through (accounting.rate_keys for cores;
  another owner adds keys of its own prefix, such as ``notify:<group>``, and trims them with
  ``policy.rate_allows``);
- ``reservations``: crash id -> ``Reservation``, room promised to a handler still writing its core;
- ``signatures``: ``"<group> <hash>"`` (or a crash site) -> when it was last seen (notify.decide);
- ``counters``: policy group -> {name: count}, what was counted instead of recorded (``records_dropped``:
  crashes over the group's record budget). ``count(group, name)`` adds, ``counter(group, name)`` reads;
  at most MAX_GROUPS groups are kept, later ones count under OTHER.

``loads`` never fails on content: a file that is not JSON raises ValueError (the caller starts a new
state), and every entry of the wrong type (a string for a time, NaN, a negative size, a bool) is dropped
and counted, so a garbled or hostile file costs its entries, never a handler.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

#: Policy groups with counters of their own; the rest count together under OTHER.
MAX_GROUPS = 4096
OTHER = "(other groups)"


@dataclass
class Reservation:
    """Compressed bytes promised to a handler (``pid``, started at ``start`` clock ticks) at ``when``."""

    size: int
    pid: int
    start: Optional[int]
    when: float


@dataclass
class State:
    rate: dict = field(default_factory=dict)  # str -> list of float
    reservations: dict = field(default_factory=dict)  # crash id -> Reservation
    signatures: dict = field(default_factory=dict)  # str -> float
    counters: dict = field(default_factory=dict)  # group -> {name: int}

    def count(self, group: str, name: str, n: int = 1) -> int:
        """Add ``n`` to ``group``'s counter ``name``; returns its new value."""
        if group not in self.counters and len(self.counters) >= MAX_GROUPS:
            group = OTHER
        counts = self.counters.setdefault(group, {})
        counts[name] = counts.get(name, 0) + n
        return counts[name]

    def counter(self, group: str, name: str) -> int:
        return self.counters.get(group, {}).get(name, 0)

    def dumps(self) -> bytes:
        return json.dumps({"rate": self.rate, "signatures": self.signatures, "counters": self.counters,
                           "reservations": {k: [r.size, r.pid, r.start, r.when]
                                            for k, r in self.reservations.items()}},
                          separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes) -> tuple:
    """(State, number of entries dropped for their type) from a state file's bytes; ValueError when they are not
    a JSON object (too deep a nesting included)."""
    try:
        raw = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(raw, dict):
        raise ValueError(f"a JSON {type(raw).__name__}, not an object")
    dropped = [0]

    def keep(value: object, check) -> bool:
        ok = bool(check(value))
        dropped[0] += not ok
        return ok

    def mapping(name: str) -> dict:
        value = raw.get(name, {})
        return value if keep(value, lambda v: isinstance(v, dict)) else {}

    state = State()
    for key, times in mapping("rate").items():
        if keep(times, lambda v: isinstance(v, list)):
            state.rate[key] = [t for t in times if keep(t, _time)]
    for key, entry in mapping("reservations").items():
        if keep(entry, _reservation):
            state.reservations[key] = Reservation(*entry)
    state.signatures = {k: v for k, v in mapping("signatures").items() if keep(v, _time)}
    for group, counts in mapping("counters").items():
        if keep(counts, lambda v: isinstance(v, dict)):
            state.counters[group] = {k: v for k, v in counts.items() if keep(v, _count)}
    return state, dropped[0]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _time(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _reservation(entry: object) -> bool:
    return (isinstance(entry, list) and len(entry) == 4 and _count(entry[0]) and _count(entry[1]) and entry[1] > 0
            and (entry[2] is None or _count(entry[2])) and _time(entry[3]))
