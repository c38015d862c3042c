"""The crashed process's executable and shared libraries, kept so a core stays debuggable.

capture.open_mapped opens ``/proc/<pid>/exe`` and ``/proc/<pid>/map_files/<range>`` while the kernel
still holds the process (``held`` wraps them): the files are the ones the process really ran, seen
through its own filesystem, and the fds keep them reachable after the process (and its container) is gone.
``save`` runs after the core is stored: it reads each file's build-id and copies it into
``<store>/.build-id/<xx>/<rest>-<sha256 prefix>``, shared by all crashes (the sha256 in the name
means a file that fakes another's build-id can never replace it).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional

from corepipe.platform import buildid
from corepipe.platform.store import CrashDir, open_dir, write_all

AREA = ".build-id"
_HEX = re.compile(r"[0-9a-f]+")
_CHUNK = 1 << 20


@dataclass
class Held:
    """One mapped file: its path as the crashed process saw it, and an fd on it."""

    path: str
    fd: int
    exe: bool = False


@dataclass
class HeldFiles:
    files: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def close(self) -> list:
        """Close every fd exactly once and say which closes failed (a FUSE or NFS FLUSH can fail a close;
        the fd is gone all the same, so it is never closed again)."""
        files, self.files = self.files, []
        failures = []
        for held in files:
            try:
                os.close(held.fd)
            except OSError as exc:
                failures.append(f"closing {held.path}: {exc.strerror or exc}")
        return failures


def held(entries: list, errors: list) -> HeldFiles:
    """The files capture.open_mapped opened (``[path, fd, is_exe]`` each), as HeldFiles."""
    return HeldFiles(files=[Held(path=path, fd=fd, exe=exe) for path, fd, exe in entries], errors=list(errors))


def stored_name(entry: dict) -> Optional[tuple]:
    """(directory, file name) below the area for a record's ``binaries.files`` entry, from checked hex only."""
    build_id, digest = entry.get("build_id"), entry.get("sha256")
    if not (isinstance(build_id, str) and isinstance(digest, str) and len(build_id) >= 4
            and _HEX.fullmatch(build_id) and len(digest) == 64 and _HEX.fullmatch(digest)):
        return None
    return build_id[:2], f"{build_id[2:]}-{digest[:16]}"


def _digest(fd: int, size: int, copy_to: Optional[int] = None) -> str:
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            raise OSError(f"file shrank to {offset} bytes while read")
        digest.update(chunk)
        if copy_to is not None:
            write_all(copy_to, chunk)
        offset += len(chunk)
    return digest.hexdigest()


def save(store_fd: int, store_path: str, held: HeldFiles, *, copy: bool, max_size: int, keep_free: int = 0) -> dict:
    """Describe every held file (build-id, size) and, if ``copy``, store it unless the crash's budget is spent
    or the copy would leave less than ``keep_free`` bytes free on the store's filesystem."""
    result: dict = {"files": [], "saved_size": 0, "errors": list(held.errors)}
    area_fd = None
    try:
        for item in held.files:
            size = os.fstat(item.fd).st_size
            entry = {"path": item.path, "exe": item.exe, "build_id": buildid.read(item.fd), "size": size,
                     "sha256": None, "stored": False, "reason": None}
            result["files"].append(entry)
            if not copy:
                entry["reason"] = "not saved for host processes (binaries_host = false)"
            elif entry["build_id"] is None:
                entry["reason"] = "no build-id"
            elif result["saved_size"] + size > max_size:
                entry["reason"] = f"over binaries_max_size ({max_size} bytes for this crash)"
            elif _free(store_fd) - size < keep_free:
                entry["reason"] = f"would leave less than keep_free ({keep_free} bytes) free"
            else:
                try:
                    if area_fd is None:
                        area_fd = open_dir(store_fd, AREA)
                    _store(area_fd, f"{store_path.rstrip('/')}/{AREA}", item.fd, entry)
                    result["saved_size"] += size
                except OSError as exc:
                    entry["reason"] = f"save failed: {exc}"
                    result["errors"].append(f"{item.path}: {exc}")
    finally:
        if area_fd is not None:
            os.close(area_fd)
    return result


def _free(fd: int) -> int:
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def _store(area_fd: int, area_path: str, fd: int, entry: dict) -> None:
    entry["sha256"] = _digest(fd, entry["size"])
    directory, name = stored_name(entry)
    sub_fd = open_dir(area_fd, directory)
    target = CrashDir(sub_fd, f"{area_path}/{directory}", "")
    try:
        try:
            st = os.stat(name, dir_fd=sub_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size == entry["size"]:
                os.utime(name, dir_fd=sub_fd, follow_symlinks=False)  # in use again: ``rm`` keeps recent files
                entry["stored"] = True
                return
        except FileNotFoundError:
            pass
        out, tmp = target.open_temp(name)
        try:
            again = _digest(fd, entry["size"], copy_to=out)
        except BaseException:
            target.discard(out, tmp)
            raise
        if again != entry["sha256"]:
            target.discard(out, tmp)
            raise OSError("the file changed while it was copied")
        target.commit(out, tmp, name)
        entry["stored"] = True
    finally:
        target.close()
