"""The on-disk store: root-only directories, written without ever following a link.

Layout::

    <root>/host/<crash>/                 crashes of host processes
    <root>/<runtime>/<container>/<crash>/ crashes inside containers
    <root>/.failed/<crash>/              crashes whose own directory could not be made (record only)
    <crash>/record.json, <crash>/core.zst

Every directory is opened relative to its parent with O_NOFOLLOW, so a symlink
planted anywhere in the store is refused, never followed. Files are written under
a hidden temporary name, fsynced and renamed, so a final name is always complete.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Optional

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RECORD = "record.json"
CORE = "core.zst"
#: Where a crash is filed when its own directory cannot be made (a link planted in its place, a full
#: directory): laid out like ``host/``, so ``list`` shows it; its record says why.
FAILED = ".failed"


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take only part of a large buffer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class StoreError(OSError):
    """The store cannot be used safely; the message says why."""


def _check_dir(fd: int, what: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise StoreError(errno.EPERM, f"{what} is owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o077:
        os.fchmod(fd, DIR_MODE)


def open_dir(parent_fd: Optional[int], name: str, create: bool = True) -> int:
    """Open (creating if asked) a store directory below ``parent_fd`` without following links."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
        except FileExistsError:
            pass
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(exc.errno, f"{name} in the store is not a directory (a symlink?)") from None
        raise
    try:
        _check_dir(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Store:
    def __init__(self, root: str, create: bool = True):
        self.root = root
        if create:
            os.makedirs(os.path.dirname(root.rstrip("/")) or "/", exist_ok=True)
        self.fd = open_dir(None, root, create=create)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_crash(self, group: tuple, timestamp: Optional[float] = None) -> CrashDir:
        """Create a fresh crash directory under ``group`` (validated path components)."""
        fd = self.fd
        opened = []
        try:
            for component in group:
                fd = open_dir(fd, component)
                opened.append(fd)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(timestamp))
            for _ in range(16):
                crash_id = os.urandom(6).hex()
                name = f"{stamp}-{crash_id}"
                try:
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    continue
                crash_fd = open_dir(fd, name, create=False)
                return CrashDir(crash_fd, "/".join((self.root.rstrip("/"),) + tuple(group) + (name,)), crash_id)
            raise StoreError(errno.EEXIST, "could not create a unique crash directory")
        finally:
            for f in opened:
                os.close(f)


class CrashDir:
    """One crash's directory; all writes are relative to its fd."""

    def __init__(self, fd: int, path: str, crash_id: str):
        self.fd = fd
        self.path = path
        self.id = crash_id

    def close(self) -> None:
        os.close(self.fd)

    def open_temp(self, final: str) -> tuple:
        """A new hidden file for ``final``; returns (fd, temporary name)."""
        for _ in range(16):
            tmp = f".{final}.{os.urandom(4).hex()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             FILE_MODE, dir_fd=self.fd)
            except FileExistsError:
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StoreError(errno.EINVAL, f"{tmp} is not a regular file")
            return fd, tmp
        raise StoreError(errno.EEXIST, f"could not create a temporary file for {final}")

    def commit(self, fd: int, tmp: str, final: str) -> None:
        """fsync and rename into place; the final name then always holds a complete file."""
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def discard(self, fd: Optional[int], tmp: str) -> None:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(tmp, dir_fd=self.fd)
        except OSError:
            pass

    def write(self, final: str, data: bytes) -> None:
        fd, tmp = self.open_temp(final)
        try:
            write_all(fd, data)
        except BaseException:
            self.discard(fd, tmp)
            raise
        self.commit(fd, tmp, final)
