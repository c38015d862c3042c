"""File helpers every layer shares: write every byte, replace a file atomically, free space, sealed memory files.

``replace`` is the one way a file is written whole: under a hidden temporary name beside it
(``O_EXCL | O_NOFOLLOW``, so nothing planted there is opened), fsynced, then renamed over the final
name, so a reader sees the old file or the complete new one, never part of it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from typing import Callable, Optional


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take only part of a large buffer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sealed_memfd(name: str, data: bytes) -> int:
    """A nameless memory file holding ``data``, at offset 0, sealed for good (no write, shrink or grow, no seal
    removed): what a less trusted process reads can be neither changed under it nor by it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        write_all(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_if_present(path: Optional[str]) -> None:
    """Remove ``path`` unless it is None or already gone (a journal entry another process may remove first)."""
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def temp_name(final: str) -> str:
    """The hidden temporary name a file has while it is written (``.<name>.<8 hex>.tmp``)."""
    return f".{final}.{os.urandom(4).hex()}.tmp"


def create_temp(dir_fd: Optional[int], directory: str, final: str, mode: int) -> tuple:
    """A new hidden file for ``final`` in ``directory`` (relative to ``dir_fd`` when given): (fd, its path
    relative to ``dir_fd``); never opens anything already there."""
    for _ in range(16):
        tmp = os.path.join(directory, temp_name(final)) if directory else temp_name(final)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=dir_fd)
        except FileExistsError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{tmp} is not a regular file")
        return fd, tmp
    raise OSError(errno.EEXIST, f"could not create a temporary file for {final}")


def commit(dir_fd: Optional[int], fd: int, tmp: str, final: str) -> None:
    """fsync and close ``fd``, rename ``tmp`` to ``final`` (both relative to ``dir_fd``), fsync the directory."""
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if dir_fd is not None:
        os.fsync(dir_fd)


def discard(dir_fd: Optional[int], fd: Optional[int], tmp: str) -> None:
    """Give up a temporary file: close it and remove it, quietly."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except OSError:
        pass


def replace(path: str, fill: Callable[[int], object], *, mode: int = 0o600, dir_fd: Optional[int] = None) -> None:
    """Write a new ``path`` (relative to ``dir_fd`` when given) through ``fill(fd)`` and put it in place
    atomically; on any failure the temporary file is removed and ``path`` is untouched."""
    directory, final = os.path.split(path)
    fd, tmp = create_temp(dir_fd, directory, final, mode)
    try:
        fill(fd)
        os.fchmod(fd, mode)
    except BaseException:
        discard(dir_fd, fd, tmp)
        raise
    try:
        commit(dir_fd, fd, tmp, path)
    except BaseException:
        discard(dir_fd, None, tmp)
        raise


def free_bytes(where: int | str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``where`` (an fd or a path): the one
    free-space figure admission, saved binaries and ``status`` use."""
    return space(where)[1]


def space(where: int | str) -> tuple:
    """(size, ``free_bytes``) of the filesystem of ``where`` (an fd or a path), from one statvfs."""
    st = os.statvfs(where)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def disk_use(root: str) -> int:
    """Bytes allocated under ``root``; links are not followed."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass
    return total


def remove_tree_when_quiet(root: str, attempts: int = 40, pause: float = 0.25) -> None:
    """Delete a directory tree, retrying while another process (a handler started before the kernel's pattern
    was put back) still adds files to it; raises the last OSError if it never goes quiet."""
    import shutil  # not on the handler's path

    for attempt in range(attempts):
        try:
            shutil.rmtree(root)
            return
        except OSError:
            if not os.path.lexists(root):
                return
            if attempt == attempts - 1:
                raise
            time.sleep(pause)
