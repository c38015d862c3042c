"""The crashes in a store, read: walk its layout (README, "Store layout"), read records, find one by id prefix.

The walk opens every directory relative to its parent without following links (store.open_dir),
so a planted symlink is skipped, not followed. A record that cannot be read or parsed is
reported through ``problems`` and skipped: one broken crash must not hide the others. Nothing here
changes the store: what adds or deletes goes through books.Books.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable, Optional

from corepipe.domain import policy
from corepipe.domain import record as records
from corepipe.platform.errors import UserError
from corepipe.platform.log import ERR, log
from corepipe.platform.store import (
    CORE_FILES,
    FAILED,
    LEDGER,
    RECORD,
    SHIP_STATUS,
    SHIPPED,
    STATE,
    TEMP_NAME,
    Store,
    crash_id,
    crash_time,
    open_dir,
    read_file,
)

_MAX_RECORD = 64 << 20


class LookupFailed(UserError):
    """No crash, or more than one, matches an id prefix; the message says which and what to do."""


def _subdirs(fd: int) -> list:
    names = []
    for name in sorted(os.listdir(fd)):
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                names.append(name)
        except OSError:
            continue
    return names


def _open(parent_fd: int, name: str, path: str, problems: Optional[list]) -> Optional[int]:
    try:
        return open_dir(parent_fd, name, create=False)
    except OSError as exc:
        if problems is not None:
            problems.append((path, f"cannot open: {exc.strerror or exc}"))
        return None


def crash_dirs(root_fd: int, root: str, problems: Optional[list]) -> Iterator[tuple]:
    """(fd of the parent directory, relative path components) of each crash directory."""
    for top in _subdirs(root_fd):
        if top.startswith(".") and top != FAILED:
            continue  # .build-id and other store-level areas
        top_fd = _open(root_fd, top, os.path.join(root, top), problems)
        if top_fd is None:
            continue
        try:
            if top in ("host", FAILED):  # host/<crash>: from before host processes were grouped by unit
                yield from ((top_fd, (top, name)) for name in _subdirs(top_fd) if crash_id(name))
            if top == FAILED:
                continue
            for container in _subdirs(top_fd):
                if top == "host" and crash_id(container):
                    continue
                container_fd = _open(top_fd, container, os.path.join(root, top, container), problems)
                if container_fd is None:
                    continue
                try:
                    yield from ((container_fd, (top, container, name)) for name in _subdirs(container_fd)
                                if crash_id(name))
                finally:
                    os.close(container_fd)
        finally:
            os.close(top_fd)


def _read_record(parent_fd: int, name: str) -> dict:
    crash_fd = open_dir(parent_fd, name, create=False)
    try:
        return read_record(crash_fd)
    finally:
        os.close(crash_fd)


def read_record(crash_fd: int) -> dict:
    """The record in the crash directory ``crash_fd`` (never through a link, never blocking on a FIFO)."""
    fd = os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=crash_fd)
    with open(fd, "rb") as f:
        return records.load(f.read(_MAX_RECORD))


def iter_records(store_root: str, problems: Optional[list] = None,
                 cache: Optional[RecordCache] = None) -> Iterator[tuple]:
    """(crash directory path, record) for every readable record, in path order; with ``cache``, what it keeps
    of each record instead, read again only when the record changed.

    Unreadable or corrupt records are skipped and, if ``problems`` is a list, appended to it
    as (path, message). A missing store yields nothing; an unreadable one raises OSError.
    """
    try:
        root_fd = open_dir(None, store_root, create=False)
    except FileNotFoundError:
        return
    try:
        for parent_fd, parts in crash_dirs(root_fd, store_root, problems):
            path = os.path.join(store_root, *parts)
            try:
                rec = cache.read(parent_fd, parts[-1], path) if cache else _read_record(parent_fd, parts[-1])
            except FileNotFoundError:
                message = "no record.json"
            except OSError as exc:
                message = f"cannot read record.json: {exc.strerror or exc}"
            except ValueError as exc:
                message = f"corrupt record.json: {exc}"
            else:
                if rec.get("id") == crash_id(parts[-1]):
                    yield path, rec
                    continue
                message = f"record.json has id {str(rec.get('id'))[:20]!r}, not the directory's"
            if problems is not None:
                problems.append((path, message))
    finally:
        os.close(root_fd)


class RecordCache:
    """What a long-running reader (the metrics endpoint) keeps of each record: ``keep(record)``, a small dict
    with at least the record's ``id``. A record is read again only when its record.json changed (inode, time,
    size), so reading a store whose records did not change opens none of them, and a big record is dropped as
    soon as it is read. ``items`` forgets the crashes that are gone."""

    def __init__(self, keep: Callable[[dict], dict]):
        self.keep = keep
        self._known: dict = {}  # path -> (stat of record.json, what was kept)
        self._seen: set = set()

    def read(self, parent_fd: int, name: str, path: str) -> dict:
        crash_fd = open_dir(parent_fd, name, create=False)
        try:
            st = os.stat(RECORD, dir_fd=crash_fd, follow_symlinks=False)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            known = self._known.get(path)
            if known is None or known[0] != stamp:
                known = self._known[path] = (stamp, self.keep(read_record(crash_fd)))
        finally:
            os.close(crash_fd)
        self._seen.add(path)
        return known[1]

    def items(self, store_root: str, problems: Optional[list] = None) -> list:
        """(path, kept record) for every readable record, as ``iter_records`` yields them."""
        self._seen = set()
        result = list(iter_records(store_root, problems, self))
        self._known = {path: self._known[path] for path in self._seen}
        return result


def generation(store_root: str) -> tuple:
    """What changes whenever a crash is finished, deleted or counted instead of recorded, or the shipper ends a
    sweep: the ledger's, the state file's and ship-status.json's (inode, time, size); ``None`` for a file that is
    not there."""
    stamps = []
    for name in (LEDGER, STATE, SHIP_STATUS):
        try:
            st = os.stat(os.path.join(store_root, name), follow_symlinks=False)
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def unshipped(path: str, rec: dict) -> bool:
    """Whether a finished crash is still to be shipped (its directory has no shipped.json): the backlog
    that ``status`` and the metrics report."""
    return rec.get("status") != "collecting" and not os.path.lexists(os.path.join(path, SHIPPED))


def last_sweep(store_root: str) -> Optional[dict]:
    """What the shipper's last sweep wrote (``ship-status.json``: time, ok, last_error...); None if it never
    ran or the file cannot be read."""
    try:
        root_fd = open_dir(None, store_root, create=False)
        try:
            last = json.loads(read_file(root_fd, SHIP_STATUS, 1 << 20) or b"null")
        finally:
            os.close(root_fd)
    except (OSError, ValueError):  # StoreError is an OSError
        return None
    return last if isinstance(last, dict) else None


def sort_key(item: tuple) -> tuple:
    """Oldest first: by dump time (whole seconds, the kernel's ``%t``), then by when the collector took the crash
    (records before ``received`` count as taken at their dump time), then id."""
    return crash_order(item[1])


def crash_order(rec: dict) -> tuple:
    """``sort_key`` of one record (or of a listing with its ``timestamp``, ``received`` and ``id``)."""
    stamp = rec.get("timestamp")
    stamp = stamp if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else 0
    received = rec.get("received")
    received = received if isinstance(received, (int, float)) and not isinstance(received, bool) else stamp
    return (stamp, received, str(rec.get("id")))


def find(store_root: str, prefix: Optional[str], problems: Optional[list] = None) -> tuple:
    """The one crash whose id starts with ``prefix`` (the latest crash when ``prefix`` is None)."""
    items = sorted(iter_records(store_root, problems), key=sort_key)
    if prefix is None:
        if not items:
            raise LookupFailed(f"no crashes in {store_root}")
        return items[-1]
    return select(items, prefix)


def select(items: list, prefix: str) -> tuple:
    """The one (path, record) among ``items`` whose id starts with ``prefix``; LookupFailed otherwise."""
    prefix = prefix.lower()
    if not re.fullmatch(r"[0-9a-f]{1,12}", prefix):
        raise LookupFailed(f"{prefix[:40]!r} is not a crash id (ids are 12 hex digits; see 'corepipe list')")
    matches = [item for item in items if str(item[1].get("id")).startswith(prefix)]
    if not matches:
        raise LookupFailed(f"no crash with id {prefix} (see 'corepipe list')")
    nodes = [str(rec.get("node")) for _path, rec in matches if rec.get("node")]
    if len(matches) > 1 and len(nodes) == len(matches) and len({str(rec.get("id")) for _p, rec in matches}) == 1:
        raise LookupFailed(f"crash {matches[0][1].get('id')} is in the index of {len(nodes)} nodes "
                           f"({', '.join(nodes[:5])}); name one: NODE/ID or --node NODE")
    if len(matches) > 1:
        ids = ", ".join(str(rec.get("id")) for _path, rec in matches[:5])
        more = ", ..." if len(matches) > 5 else ""
        raise LookupFailed(f"id prefix {prefix} is ambiguous: {len(matches)} crashes ({ids}{more}); give more digits")
    return matches[0]


# -- what the store holds, from its directories (prune, and books.rebuild_ledger) --------------------------


@dataclass
class Temp:
    """A hidden temporary file left in a crash directory (a handler still writing, or killed)."""

    group: str
    crash: str
    name: str
    mtime: float


@dataclass
class Contents:
    crashes: list = field(default_factory=list)  # policy.Core, one per crash directory
    temps: list = field(default_factory=list)


def scan(store: Store) -> Contents:
    """Every crash directory and leftover temporary file, without following any link. A crash's time is
    when its core was written (crashes in the same second keep their order), or the dump time in its name
    when it has no core."""
    contents = Contents()
    problems: list = []
    for parent_fd, parts in crash_dirs(store.fd, store.root, problems):
        crash_fd = _open(parent_fd, parts[-1], os.path.join(store.root, *parts), problems)
        if crash_fd is None:
            continue
        group, crash = "/".join(parts[:-1]), parts[-1]
        try:
            core, size, when, record_size = None, 0, crash_time(crash), 0
            for name in os.listdir(crash_fd):
                try:
                    st = os.stat(name, dir_fd=crash_fd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if name in CORE_FILES:
                    core, size, when = name, st.st_blocks * 512, st.st_mtime
                elif name == RECORD:
                    record_size = st.st_blocks * 512
                elif TEMP_NAME.fullmatch(name):
                    contents.temps.append(Temp(group, crash, name, st.st_mtime))
            contents.crashes.append(policy.Core(group=group, crash=crash, size=size, time=when, file=core,
                                                record=record_size))
        finally:
            os.close(crash_fd)
    for path, message in problems:
        log(f"error: store {store.root}: skipping {path}: {message}", ERR)
    return contents


def group_of(path: str, root: str) -> tuple:
    """(group, crash directory name) of a crash directory ``path`` found below ``root`` by ``iter_records``."""
    parts = os.path.relpath(path, root).split(os.sep)
    return "/".join(parts[:-1]), parts[-1]
