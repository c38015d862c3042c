"""The crashes in a store: walk its layout (README, "Store layout") and find one by id prefix.

The walk opens every directory relative to its parent without following links (store.open_dir),
so a planted symlink is skipped, not followed. A record that cannot be read or parsed is
reported through ``problems`` and skipped: one broken crash must not hide the others.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from typing import Optional

from corepipe.domain import record as records
from corepipe.platform.store import FAILED, RECORD, open_dir

CRASH_DIR = re.compile(r"\d{8}T\d{6}Z-([0-9a-f]{12})")
_MAX_RECORD = 64 << 20


class LookupFailed(Exception):
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
            if top in ("host", FAILED):
                yield from ((top_fd, (top, name)) for name in _subdirs(top_fd) if CRASH_DIR.fullmatch(name))
                continue
            for container in _subdirs(top_fd):
                container_fd = _open(top_fd, container, os.path.join(root, top, container), problems)
                if container_fd is None:
                    continue
                try:
                    yield from ((container_fd, (top, container, name)) for name in _subdirs(container_fd)
                                if CRASH_DIR.fullmatch(name))
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


def iter_records(store_root: str, problems: Optional[list] = None) -> Iterator[tuple]:
    """(crash directory path, record) for every readable record, in path order.

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
                rec = _read_record(parent_fd, parts[-1])
            except FileNotFoundError:
                message = "no record.json"
            except OSError as exc:
                message = f"cannot read record.json: {exc.strerror or exc}"
            except ValueError as exc:
                message = f"corrupt record.json: {exc}"
            else:
                if rec.get("id") == CRASH_DIR.fullmatch(parts[-1]).group(1):
                    yield path, rec
                    continue
                message = f"record.json has id {str(rec.get('id'))[:20]!r}, not the directory's"
            if problems is not None:
                problems.append((path, message))
    finally:
        os.close(root_fd)


def sort_key(item: tuple) -> tuple:
    """Oldest first: by dump time, then id."""
    rec = item[1]
    stamp = rec.get("timestamp")
    return (stamp if isinstance(stamp, (int, float)) else 0, str(rec.get("id")))


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
    if len(matches) > 1:
        ids = ", ".join(str(rec.get("id")) for _path, rec in matches[:5])
        more = ", ..." if len(matches) > 5 else ""
        raise LookupFailed(f"id prefix {prefix} is ambiguous: {len(matches)} crashes ({ids}{more}); give more digits")
    return matches[0]
