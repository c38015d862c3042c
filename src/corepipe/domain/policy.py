"""Storage policy as pure decisions: given what the store holds and the limits, what to delete, how much room.

Nothing here touches the disk, so every rule can be unit-tested with made-up figures.
The rules (README, "Storage policy"): a container keeps at most ``container_max_cores``
cores and ``container_max_bytes`` bytes of cores; the store's cores and the saved binaries they
use take at most ``max_use`` and leave ``keep_free`` free on its filesystem. Room is made by
deleting the oldest cores, first of the container the new core belongs to (for its own limits), then of whichever
container uses the most (for the global ones) among its own and those that hold more cores than it will: a
brand-new group never evicts a group of as few cores (a flood of fresh groups gets no room, not another
group's cores). A crash not yet stored is never a candidate. Records have a budget of their own per policy
group (``records_budget``): a core is never deleted to make room for records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

GIB = 1 << 30
#: Automatic limits, as systemd-coredump: MaxUse 10% and KeepFree 15% of the filesystem, each at most 4 GiB.
AUTO_MAX_USE = (10, 4 * GIB)
AUTO_KEEP_FREE = (15, 4 * GIB)
#: Left free on the filesystem whatever the limits say, for the records (and the state file) still to come.
MARGIN = 256 * 1024


@dataclass(frozen=True)
class Core:
    """A crash in the store: its container group ("host", "docker/<id>"), directory name, time, and its core
    file's name and bytes on disk (``file`` None: no core), the saved binaries its core uses (keys of
    ``plan``'s ``shared``) and its record's bytes on disk."""

    group: str
    crash: str
    size: int
    time: float
    file: Optional[str] = None
    binaries: tuple = ()
    record: int = 0


@dataclass
class Limits:
    """Effective limits in bytes (0: none), see ``limits()``."""

    max_use: int = 0
    keep_free: int = 0
    container_max_cores: int = 0
    container_max_bytes: int = 0


@dataclass
class Plan:
    #: Cores to delete, oldest first, each with the reason.
    delete: list = field(default_factory=list)
    #: Bytes the new core may take on disk (compressed) after the deletions; 0 means none.
    budget: int = 0
    #: The limit that decides ``budget`` (for the record when the core does not fit).
    limited_by: Optional[str] = None
    #: Bytes the store's cores and binaries use after the deletions (reservations included).
    used: int = 0


def automatic(setting: int, fs_size: int, auto: tuple) -> int:
    """A max_use/keep_free setting in bytes: -1 is a percentage of the filesystem with a cap."""
    if setting >= 0:
        return setting
    percent, cap = auto
    return min(fs_size * percent // 100, cap)


def limits(*, max_use: int, keep_free: int, container_max_cores: int, container_max_bytes: int,
           fs_size: int) -> Limits:
    return Limits(max_use=automatic(max_use, fs_size, AUTO_MAX_USE),
                  keep_free=automatic(keep_free, fs_size, AUTO_KEEP_FREE),
                  container_max_cores=container_max_cores, container_max_bytes=container_max_bytes)


class Holdings:
    """What the store holds, as ``plan`` reads it: per container group its number and bytes of cores, the
    cores of a group (asked only for the groups ``plan`` needs: a ledger loads them on demand), per saved
    binary its bytes and how many cores use it. Built here from a list; ledger.Ledger is another."""

    def __init__(self, cores: list, shared: Optional[dict] = None):
        self._cores: dict = {}
        self.binaries: dict = {}
        for core in cores:
            if core.file:
                self._cores.setdefault(core.group, []).append(core)
                for name in core.binaries:
                    self.binaries.setdefault(name, [(shared or {}).get(name, 0), 0])[1] += 1

    def groups(self) -> dict:
        return {g: [len(cores), sum(c.size for c in cores)] for g, cores in self._cores.items()}

    def cores(self, group: str) -> list:
        return list(self._cores.get(group, []))


def plan(cores: object, lim: Limits, *, fs_free: int, reserved: int = 0, group: Optional[str] = None,
         want: int = 0, shared: Optional[dict] = None) -> Plan:
    """What to delete so the limits hold with one more core of ``want`` bytes in ``group``.

    ``cores`` is a list of Core (``shared``: the bytes of each saved binary they use) or a Holdings-like
    object; only the groups the decision needs are asked for their cores (the new core's own, and the
    biggest while the global limits are over). With ``group`` None (``corepipe prune``) only the existing
    cores are brought within the limits. ``reserved`` is room already promised to handlers still writing;
    it counts as used. Saved binaries count towards ``max_use`` while a core uses them, and deleting the
    last core that uses one frees it too; records do not (they have ``records_budget``).
    """
    holdings = Holdings(cores, shared) if isinstance(cores, list) else cores
    result = Plan()
    counts = {g: n for g, (n, _size) in holdings.groups().items() if n}
    bytes_of = {g: size for g, (n, size) in holdings.groups().items() if n}
    users = {name: refs for name, (_size, refs) in holdings.binaries.items() if refs > 0}
    sizes = {name: size for name, (size, _refs) in holdings.binaries.items()}
    binary_use = sum(sizes[name] for name in users)
    freed = 0
    loaded: dict = {}
    new = 1 if group is not None else 0

    def remaining(g: str) -> list:
        """The cores of ``g`` not yet dropped, oldest first."""
        if g not in loaded:
            loaded[g] = sorted((c for c in holdings.cores(g) if c.file), key=lambda c: (c.time, c.crash))
        return loaded[g]

    def drop(core: Core, reason: str) -> None:
        nonlocal binary_use, freed
        remaining(core.group).remove(core)
        counts[core.group] -= 1
        bytes_of[core.group] -= core.size
        result.delete.append((core, reason))
        freed += core.size
        for name in core.binaries:
            if name in users:
                users[name] -= 1
                if not users[name]:
                    del users[name]
                    binary_use -= sizes[name]
                    freed += sizes[name]

    for g in sorted(counts) if group is None else [group]:
        own = remaining(g)
        while lim.container_max_cores and own and len(own) + new > lim.container_max_cores:
            drop(own[0], f"container {g} is over container_max_cores ({lim.container_max_cores})")
        while lim.container_max_bytes and own and sum(c.size for c in own) + want * new > lim.container_max_bytes:
            drop(own[0], f"container {g} is over container_max_bytes ({lim.container_max_bytes})")

    def used() -> int:
        return sum(bytes_of.values()) + binary_use + reserved

    while any(counts.values()):
        if lim.max_use and used() + want > lim.max_use:
            reason = f"the store is over max_use ({lim.max_use} bytes)"
        elif lim.keep_free and fs_free + freed - want < lim.keep_free:
            reason = f"the filesystem has less than keep_free ({lim.keep_free} bytes) free"
        else:
            break
        # A new core takes room only from its own group or from groups that hold more cores than its group will:
        # a flood of fresh groups (one core each) cannot evict a group of as few cores, only the biggest hoards.
        fair = [g for g, n in counts.items() if n and (group is None or g == group or n > counts.get(group, 0) + new)]
        if not fair:
            break
        biggest = max(sorted(fair), key=lambda g: bytes_of[g])
        drop(remaining(biggest)[0], f"{reason}; {biggest} uses the most")

    result.used = used()
    free = fs_free + freed
    if group is not None:
        # Room promised to other handlers is not on the disk yet but will be: it is not free.
        rooms = [("free space on the filesystem", free - reserved - MARGIN)]
        if lim.max_use:
            rooms.append((f"max_use ({lim.max_use} bytes)", lim.max_use - used()))
        if lim.keep_free:
            rooms.append((f"keep_free ({lim.keep_free} bytes)", free - reserved - lim.keep_free - MARGIN))
        if lim.container_max_bytes:
            own_bytes = bytes_of.get(group, 0)
            rooms.append((f"container_max_bytes ({lim.container_max_bytes})", lim.container_max_bytes - own_bytes))
        name, room = min(rooms, key=lambda r: r[1])
        result.budget = max(0, room)
        result.limited_by = name
    return result


def records_budget(setting: int, lim: Limits) -> int:
    """Bytes of records one policy group may hold (0: no limit): ``records_max_use``, -1 a tenth of the
    effective max_use (at most 256 MiB; none when max_use is 0)."""
    if setting >= 0:
        return setting
    return min(lim.max_use // 10, 256 << 20)


def records_over(crashes: list, budget: int) -> list:
    """The oldest records without a core (``crashes``: Core entries; ``file`` None: no core) to delete so each
    group's records (with a core or not) take at most ``budget`` bytes (0: none)."""
    if not budget:
        return []
    by_group: dict = {}
    for crash in crashes:
        by_group.setdefault(crash.group, []).append(crash)
    chosen = []
    for _group, own in sorted(by_group.items()):
        excess = sum(c.record for c in own) - budget
        if excess > 0:
            chosen += oldest_records([c for c in own if not c.file], excess)
    return chosen


def oldest_records(crashes: list, excess: int) -> list:
    """The oldest of ``crashes`` (Core entries without a core) whose records free at least ``excess`` bytes:
    when records keep a group over its budget (a crash loop rate limited for weeks), or all of them the store
    over max_use, they go."""
    chosen, freed = [], 0
    for crash in sorted(crashes, key=lambda c: (c.time, c.crash)):
        if freed >= excess:
            break
        chosen.append(crash)
        freed += crash.record
    return chosen


def expired(cores_and_crashes: list, *, now: float, max_age_days: int) -> list:
    """The crashes (any object with ``.time``) older than ``max_age_days``; none when it is 0."""
    if not max_age_days:
        return []
    cutoff = now - max_age_days * 86400
    return [c for c in cores_and_crashes if c.time < cutoff]


def rate_allows(times: list, *, now: float, window: int, limit: int) -> tuple:
    """(allowed, recent times) for one rate-limit key: at most ``limit`` cores within ``window`` seconds."""
    recent = [t for t in times if isinstance(t, (int, float)) and now - window < t <= now + window]
    if not limit or not window:
        return True, recent
    return len(recent) < limit, recent


def estimate(rss_kib: Optional[int], vm_kib: Optional[int], cap: Optional[int]) -> Optional[int]:
    """Expected compressed size of a core: its resident (incl. swapped) memory, a little for the
    zero pages of untouched mappings, and 1 MiB of notes and headers; never above ``cap``.
    None when nothing is known."""
    if rss_kib is None:
        return cap
    guess = rss_kib * 1024 + (vm_kib or 0) * 1024 // 1000 + (1 << 20)
    return guess if cap is None else min(guess, cap + (1 << 20))


def excluded(*, exe: str, container_name: Optional[str], container_id: Optional[str], image: Optional[str],
             executables: list, containers: list, images: list) -> Optional[str]:
    """Why the config excludes this crash from having a core stored (the first pattern that matches), or None.

    Shell-style patterns (fnmatch, case-sensitive): ``executables`` against the executable's path (its comm
    when the path is unknown), ``containers`` against the container's name and its id, ``images`` against
    its image. A host process has no container name, id or image: only ``executables`` can match it."""
    if not (executables or containers or images):
        return None
    from fnmatch import fnmatchcase  # only with patterns: the pipe handler does without its import

    for key, patterns, values in (("exclude_executables", executables, (exe,)),
                                  ("exclude_containers", containers, (container_name, container_id)),
                                  ("exclude_images", images, (image,))):
        for pattern in patterns:
            for value in values:
                if value and fnmatchcase(value, pattern):
                    return f"not stored: excluded by config ({key}: {value!r} matches {pattern!r})"
    return None
