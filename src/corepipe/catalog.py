"""Reading the store back: every crash directory and its record, without following a link.

The layout is fixed (see store.py): ``host/<crash>/`` and ``<runtime>/<container>/<crash>/``.
Every directory is opened relative to its parent with O_NOFOLLOW, so a symlink planted in
the store is skipped, never followed; a record that cannot be read is skipped and reported.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import Optional

from corepipe import record
from corepipe.store import RECORD

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A record holds bounded /proc texts (maps, mountinfo, environ, ...); anything bigger is not one of ours.
RECORD_MAX = 64 << 20


def _subdirs(fd: int) -> list:
    """Names of the real (non-link, non-hidden) directories in ``fd``, sorted."""
    with os.scandir(fd) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))


def _open_dir(parent_fd: Optional[int], name: str) -> Optional[int]:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return None
        raise


def _read_record(crash_fd: int) -> dict:
    fd = os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=crash_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RECORD_MAX:
            raise ValueError("not a regular file of a sane size")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return record.load(b"".join(chunks))
    finally:
        os.close(fd)


def crash_groups(store_root: str) -> Iterator[tuple]:
    """(group path components, fd of that group directory) for ``host`` and every ``<runtime>/<container>``."""
    root_fd = _open_dir(None, store_root)
    if root_fd is None:
        return
    try:
        for top in _subdirs(root_fd):
            top_fd = _open_dir(root_fd, top)
            if top_fd is None:
                continue
            try:
                if top == "host":
                    yield (top,), top_fd
                    continue
                for container in _subdirs(top_fd):
                    group_fd = _open_dir(top_fd, container)
                    if group_fd is None:
                        continue
                    try:
                        yield (top, container), group_fd
                    finally:
                        os.close(group_fd)
            finally:
                os.close(top_fd)
    finally:
        os.close(root_fd)


def iter_records(store_root: str, errors: Optional[list] = None) -> Iterator[tuple]:
    """Yield ``(crash_dir_path, record_dict)`` for every readable record; unreadable ones go to ``errors``."""
    root = store_root.rstrip("/") or "/"
    for group, group_fd in crash_groups(root):
        for crash in _subdirs(group_fd):
            path = "/".join((root, *group, crash))
            crash_fd = _open_dir(group_fd, crash)
            if crash_fd is None:
                continue
            try:
                rec = _read_record(crash_fd)
            except FileNotFoundError:
                continue  # the handler has just created the directory
            except (OSError, ValueError) as exc:
                if errors is not None:
                    errors.append(f"{path}: {exc}")
                continue
            finally:
                os.close(crash_fd)
            yield path, rec


def remove_tree(parent_fd: Optional[int], name: str) -> None:
    """Delete ``name`` below ``parent_fd`` and everything in it; links are unlinked, never followed."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            os.unlink(name, dir_fd=parent_fd)
            return
        if exc.errno == errno.ENOENT:
            return
        raise
    try:
        with os.scandir(fd) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(fd, entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_crash(store_root: str, crash_dir: str) -> None:
    """Delete one crash directory (a path from iter_records) and the group directories it leaves empty."""
    root = store_root.rstrip("/") or "/"
    relative = os.path.relpath(crash_dir, root).split("/")
    if len(relative) not in (2, 3) or any(p in ("", ".", "..") for p in relative):
        raise ValueError(f"{crash_dir} is not a crash directory of {root}")
    fds = [os.open(root, _DIR_FLAGS)]
    try:
        for part in relative[:-1]:
            fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
        remove_tree(fds[-1], relative[-1])
        for depth in range(len(relative) - 1, 0, -1):
            try:
                os.rmdir(relative[depth - 1], dir_fd=fds[depth - 1])
            except OSError:
                break  # not empty: other crashes live there
    finally:
        for fd in fds:
            os.close(fd)
