"""The on-disk store: root-only directories, written without ever following a link.

Layout (README, "Store layout"); every name in it is made and parsed here, nowhere else::

    <root>/host/<crash>/                 crashes of host processes
    <root>/<runtime>/<container>/<crash>/ crashes inside containers
    <root>/.failed/<crash>/              crashes whose own directory could not be made (record only)
    <crash>/record.json, <crash>/core.zst (or core.partial.zst), <crash>/.<name>.<8 hex>.tmp while written
    <root>/.lock, .state.json, .ledger.json, .build-id/<xx>/<rest>-<sha256:16>, <group>/.cores.json
    <crash>/shipped.json                 written by ``corepipe ship`` once the crash is verified remotely
    <crash>/ship-progress.json           an upload in progress (upload id, parts done), for resuming
    <root>/.ship-status.json             the shipper's last sweep: backlog, last error
    <root>/.ship.lock                    held (flock) by the one shipper sweeping the store

``<crash>`` is ``<UTC time>-<12 hex id>``. Readers take a core's file name from its record
(``core_file``), checked against the names a core may have, never a path built from the record.

Every directory is opened relative to its parent with O_NOFOLLOW, so a symlink
planted anywhere in the store is refused, never followed. Files are written under
a hidden temporary name, fsynced and renamed, so a final name is always complete.
"""

from __future__ import annotations

import calendar
import errno
import os
import re
import stat
import time
from typing import Optional

from corepipe.platform import fs
from corepipe.platform.fs import write_all

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RECORD = "record.json"
#: A whole core, and one the kernel stopped sending before the length its ELF headers announce.
CORE = "core.zst"
PARTIAL_CORE = "core.partial.zst"
CORE_FILES = (CORE, PARTIAL_CORE)
#: The store's own files (store.lock, accounting, ledger) and the shared area of saved binaries (binaries).
LOCK = ".lock"
STATE = ".state.json"
LEDGER = ".ledger.json"
#: In each container group's directory (``host``, ``docker/<id>``): that group's stored cores (ledger.py).
GROUP_LEDGER = ".cores.json"
BUILD_ID = ".build-id"
#: ``corepipe ship``: a crash's marker once verified remotely, its upload in progress; the shipper's
#: last sweep and the lock one shipper holds.
SHIPPED = "shipped.json"
SHIP_PROGRESS = "ship-progress.json"
SHIP_STATUS = ".ship-status.json"
SHIP_LOCK = ".ship.lock"
#: The shipper's count of its index objects per day not yet compacted (services/ship.py, domain/fleet_compact.py).
SHIP_INDEX = ".ship-index.json"
#: The directory of one crash, and the hidden temporary name a file has while it is written (fs.temp_name).
CRASH_DIR = re.compile(r"(\d{8}T\d{6}Z)-([0-9a-f]{12})")
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_STAMP = "%Y%m%dT%H%M%SZ"
_HEX = re.compile(r"[0-9a-f]+")


def crash_dir_name(crash: str, timestamp: Optional[float] = None) -> str:
    """``<UTC time>-<id>`` for the crash ``crash`` dumped at ``timestamp`` (now when None)."""
    return f"{time.strftime(_STAMP, time.gmtime(timestamp))}-{crash}"


def crash_id(name: str) -> Optional[str]:
    """The id in a crash directory's name; None if ``name`` is not one."""
    match = CRASH_DIR.fullmatch(name)
    return match.group(2) if match else None


def crash_time(name: str) -> float:
    """The dump time in a crash directory's name (0 when it has none)."""
    match = CRASH_DIR.fullmatch(name)
    try:
        return float(calendar.timegm(time.strptime(match.group(1), _STAMP))) if match else 0.0
    except ValueError:
        return 0.0


def core_file(record: dict) -> Optional[str]:
    """The name of the core a record says is stored, if it is one a core may have (else None)."""
    core = record.get("core") if isinstance(record, dict) else None
    name = core.get("file") if isinstance(core, dict) else None
    return name if name in CORE_FILES else None


#: Where a crash is filed when its own directory cannot be made (a link planted in its place, a full
#: directory): laid out like ``host/``, so ``list`` shows it; its record says why.
FAILED = ".failed"


def binary_name(build_id: object, sha256: object) -> Optional[tuple]:
    """(directory, file name) below BUILD_ID of a saved binary, from checked hex only."""
    if not (isinstance(build_id, str) and isinstance(sha256, str) and len(build_id) >= 4
            and _HEX.fullmatch(build_id) and len(sha256) == 64 and _HEX.fullmatch(sha256)):
        return None
    return build_id[:2], f"{build_id[2:]}-{sha256[:16]}"


def is_binary_name(directory: str, name: str) -> bool:
    """Whether ``directory/name`` below BUILD_ID is one ``binary_name`` makes (a temporary file is not)."""
    rest, sep, digest = name.rpartition("-")
    return (len(directory) == 2 and bool(_HEX.fullmatch(directory)) and bool(sep) and bool(_HEX.fullmatch(rest))
            and len(digest) == 16 and bool(_HEX.fullmatch(digest)))


class StoreError(OSError):
    """The store cannot be used safely; the message says why."""


def read_file(dir_fd: int, name: str, limit: int) -> Optional[bytes]:
    """A small file of the store's own (state, ledger), never through a link or from a FIFO; None when it
    does not exist. StoreError when it is not a plain file of ours or over ``limit`` bytes."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > limit:
            raise StoreError(errno.EINVAL, f"{name} is not a plain file of ours")
        chunks = []
        while True:
            chunk = os.read(fd, limit + 1 - sum(map(len, chunks)))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise StoreError(errno.EFBIG, f"{name} is over {limit} bytes")
    finally:
        os.close(fd)


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


class StoreDir:
    """A directory of the store, opened without following links: its fd, its path (for messages), and the
    files in it written whole (``write``) or through a hidden temporary (``open_temp``, ``commit``)."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    def close(self) -> None:
        os.close(self.fd)

    def open_temp(self, final: str) -> tuple:
        """A new hidden file for ``final``; returns (fd, temporary name)."""
        return fs.create_temp(self.fd, "", final, FILE_MODE)

    def commit(self, fd: int, tmp: str, final: str) -> None:
        """fsync and rename into place; the final name then always holds a complete file."""
        fs.commit(self.fd, fd, tmp, final)

    def discard(self, fd: Optional[int], tmp: str) -> None:
        fs.discard(self.fd, fd, tmp)

    def write(self, final: str, data: bytes) -> None:
        fs.replace(final, lambda fd: write_all(fd, data), mode=FILE_MODE, dir_fd=self.fd)

    def open_path(self, components: list) -> int:
        """A new fd on <this directory>/<components...>, each opened without following links."""
        fd = self.fd
        for component in components:
            child = open_dir(fd, component, create=False)
            if fd != self.fd:
                os.close(fd)
            fd = child
        return fd if fd != self.fd else os.dup(fd)


class Store(StoreDir):
    """The store's root directory (``root``: its path)."""

    def __init__(self, root: str, create: bool = True):
        self.root = root
        if create:
            os.makedirs(os.path.dirname(root.rstrip("/")) or "/", exist_ok=True)
        super().__init__(open_dir(None, root, create=create), root)

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
            for _ in range(16):
                new_id = os.urandom(6).hex()
                name = crash_dir_name(new_id, timestamp)
                try:
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    continue
                crash_fd = open_dir(fd, name, create=False)
                return CrashDir(crash_fd, "/".join((self.root.rstrip("/"),) + tuple(group) + (name,)), new_id)
            raise StoreError(errno.EEXIST, "could not create a unique crash directory")
        finally:
            for f in opened:
                os.close(f)


class CrashDir(StoreDir):
    """One crash's directory (``id``: the crash's id)."""

    def __init__(self, fd: int, path: str, crash_id: str):
        super().__init__(fd, path)
        self.id = crash_id
