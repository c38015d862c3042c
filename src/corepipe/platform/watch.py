"""Wake up when something is filed in the store: inotify through libc.py (no dependency), polling otherwise.

The shipper sleeps in ``wait`` between sweeps; a new directory or a record renamed into place ends
the wait at once (the shipper's own files, progress and status, do not).
Watches are added by path with IN_DONTFOLLOW and IN_ONLYDIR: a planted symlink is never watched through.
"""

from __future__ import annotations

import os
import select
import struct
import time
from typing import Optional

from corepipe.platform import libc
from corepipe.platform.store import RECORD

IN_CREATE, IN_MOVED_TO, IN_ISDIR = 0x100, 0x80, 0x40000000
IN_ONLYDIR, IN_DONTFOLLOW = 0x01000000, 0x02000000
_EVENT = struct.Struct("iIII")
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000


class Watcher:
    def __init__(self, root: str, depth: int = 3):
        self.root = root
        self.depth = depth
        self.fd: Optional[int] = None
        try:
            self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            self.fd = None

    @property
    def event_driven(self) -> bool:
        return self.fd is not None

    def watch_tree(self) -> None:
        """Watch the store and its directories down to the crash directories (again after every sweep:
        adding a watch twice is harmless, and new directories get theirs)."""
        if self.fd is None:
            return
        base = self.root.rstrip("/").count("/")
        for directory, subdirs, _files in os.walk(self.root, followlinks=False):
            try:
                libc.inotify_add_watch(self.fd, directory, IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONTFOLLOW)
            except OSError:
                pass  # gone since the walk found it, or out of watches: polling still finds what is filed
            if directory.rstrip("/").count("/") - base >= self.depth:
                subdirs.clear()

    def wait(self, timeout: float) -> bool:
        """True when a directory was made or a record filed before ``timeout`` seconds passed."""
        if self.fd is None:
            select.select([], [], [], timeout)
            return False
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and self._relevant():
                return True

    def _relevant(self) -> bool:
        found = False
        try:
            while True:
                data = os.read(self.fd, 65536)  # type: ignore[arg-type]
                offset = 0
                while offset + _EVENT.size <= len(data):
                    _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                    name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                    found = found or bool(mask & IN_ISDIR and mask & IN_CREATE) or (
                        bool(mask & IN_MOVED_TO) and name == RECORD.encode())
                    offset += _EVENT.size + length
        except BlockingIOError:
            pass
        return found

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
