"""The crashed process's executable and shared libraries, kept so a core stays debuggable.

``hold`` opens ``/proc/<pid>/exe`` and ``/proc/<pid>/map_files/<range>`` while the kernel still
holds the process: the files are the ones the process really ran, seen through its own
filesystem, and the fds keep them reachable after the process (and its container) is gone.
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

from corepipe import buildid
from corepipe.store import CrashDir, open_dir

AREA = ".build-id"
MAX_FILES = 1024
_RANGE = re.compile(r"[0-9a-f]{1,16}-[0-9a-f]{1,16}")
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

    def close(self) -> None:
        for held in self.files:
            os.close(held.fd)
        self.files = []


def mapped_files(maps: str) -> list:
    """(address range, path) of each distinct file-backed mapping in a /proc/<pid>/maps text."""
    seen, result = set(), []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/") or not _RANGE.fullmatch(parts[0]):
            continue
        key = (parts[3], parts[4])
        if key not in seen:
            seen.add(key)
            result.append((parts[0], parts[5]))
    return result


def hold(dir_fd: int, maps: str, exe: Optional[str]) -> HeldFiles:
    """Open the exe and each mapped file relative to the /proc/<pid> directory fd."""
    held = HeldFiles()
    try:
        exe_fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        held.errors.append(f"exe: {exc.strerror}")
        exe_fd = None
    exe_id = None
    if exe_fd is not None:
        st = os.fstat(exe_fd)
        exe_id = (st.st_dev, st.st_ino)
        held.files.append(Held(path=exe or "?", fd=exe_fd, exe=True))
    for address, path in mapped_files(maps)[:MAX_FILES]:
        try:
            fd = os.open(f"map_files/{address}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            held.errors.append(f"{path}: {exc.strerror}")
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == exe_id or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if exe_id is not None and (st.st_dev, st.st_ino) == exe_id:
                held.files[0].path = path  # the mapping's path is the one the core's notes use
            continue
        held.files.append(Held(path=path, fd=fd))
    return held


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
            view = memoryview(chunk)
            while view:
                view = view[os.write(copy_to, view):]
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
