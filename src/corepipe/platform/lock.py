"""The store's lock (``<store>/.lock``, flock): every decision about what the store holds is taken under it.

Handlers running at the same time, ``prune``, ``rm`` and ``uninstall --purge`` all take it, so no two
of them delete, count or reserve at once. It is held only while deciding, never while a core is
written. A lock file that is not a plain file of ours (a planted symlink, FIFO, directory or hard
link) is replaced, never opened through.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from corepipe.platform.log import ERR, log
from corepipe.platform.store import LOCK, Store, StoreError


class StoreLock:
    """The store's lock, held for a ``with`` block."""

    def __init__(self, store: Store):
        self.store = store
        self.fd = self._open()

    def _open(self) -> int:
        for _ in range(4):
            try:
                fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                             dir_fd=self.store.fd)
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    fd = os.open(LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=self.store.fd)
                elif exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    self._remove_planted()
                    continue
                else:
                    raise
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
                return fd
            os.close(fd)
            self._remove_planted()
        raise StoreError(errno.EPERM, f"{self.store.root}/{LOCK} keeps being replaced; not using the store")

    def _remove_planted(self) -> None:
        log(f"error: {self.store.root}/{LOCK} is not a plain file of ours; replacing it", ERR)
        try:
            os.unlink(LOCK, dir_fd=self.store.fd)
        except IsADirectoryError:
            os.rmdir(LOCK, dir_fd=self.store.fd)

    def __enter__(self) -> StoreLock:
        for _ in range(8):
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            # Locked, but is it still the lock file? (Another handler may have just replaced a planted one.)
            try:
                current = os.stat(LOCK, dir_fd=self.store.fd, follow_symlinks=False)
            except OSError:
                current = None
            mine = os.fstat(self.fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return self
            os.close(self.fd)
            self.fd = self._open()
        raise StoreError(errno.EPERM, f"{self.store.root}/{LOCK} keeps being replaced; not using the store")

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
