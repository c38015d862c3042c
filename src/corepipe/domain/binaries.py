"""The crashed process's executable and shared libraries, kept so a core stays debuggable.

capture.open_mapped opens ``/proc/<pid>/exe`` and ``/proc/<pid>/map_files/<range>`` while the kernel
still holds the process (``held`` wraps them): the files are the ones the process really ran, seen
through its own filesystem, and the fds keep them reachable after the process (and its container) is gone.
``save`` runs after the core is stored: it reads each file's build-id and copies it into
``<store>/.build-id/<xx>/<rest>-<sha256 prefix>``, shared by all crashes (the sha256 in the name
means a file that fakes another's build-id can never replace it).

A saved file lives as long as a stored core uses it: the ledger (ledger.py) counts the cores
referring to each one, books.Books deletes it (``remove``) with the last of them, and
``prune_unused`` sweeps files nothing refers to (a handler killed before it registered them).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Optional

from corepipe.platform import elf
from corepipe.platform.fs import free_bytes, write_all
from corepipe.platform.store import BUILD_ID, StoreDir, binary_name, is_binary_name, open_dir

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
    """(directory, file name) below BUILD_ID for a record's ``binaries.files`` entry, from checked hex only."""
    return binary_name(entry.get("build_id"), entry.get("sha256"))


def saved_path(store: str, entry: dict) -> Optional[str]:
    """Where the copy of a record's ``binaries.files`` entry is in the store at ``store``, if one was saved (and is
    still there, a regular file); None otherwise."""
    name = stored_name(entry) if isinstance(entry, dict) and entry.get("stored") else None
    if name is None:
        return None
    path = os.path.join(store, BUILD_ID, *name)
    try:
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None


def key(entry: dict) -> Optional[str]:
    """The ledger's key ("xx/name") of a record's stored ``binaries.files`` entry; None if not stored."""
    name = stored_name(entry) if isinstance(entry, dict) and entry.get("stored") else None
    return "/".join(name) if name else None


def referenced(records: list) -> set:
    """The keys of the saved binaries the records ``records`` refer to."""
    return {k for rec in records for k in map(key, (rec.get("binaries") or {}).get("files") or []) if k}


def on_disk(store_fd: int, rec: dict) -> tuple:
    """([(key, bytes on disk)] of each saved binary the record refers to that is in the store, [keys of those
    whose file is gone]: deleted by another handler before this crash registered it)."""
    items, missing = [], []
    for entry in (rec.get("binaries") or {}).get("files") or []:
        name = key(entry)
        if name is None:
            continue
        directory, _, file = name.partition("/")
        try:
            sub_fd = _open_area(store_fd, directory)
            try:
                st = os.stat(file, dir_fd=sub_fd, follow_symlinks=False)
            finally:
                os.close(sub_fd)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            missing.append(name)
            continue
        items.append((name, st.st_blocks * 512))
    return items, missing


def _open_area(store_fd: int, directory: str) -> int:
    """An fd on .build-id/<directory>, each step opened without following links."""
    area_fd = open_dir(store_fd, BUILD_ID, create=False)
    try:
        return open_dir(area_fd, directory, create=False)
    finally:
        os.close(area_fd)


def remove(store_fd: int, keys: list) -> int:
    """Delete the saved binaries ``keys`` (no core uses them any more); returns how many were deleted."""
    removed = 0
    for name in keys:
        directory, _, file = name.partition("/")
        if not is_binary_name(directory, file):
            continue
        try:
            area_fd = _open_area(store_fd, directory)
        except FileNotFoundError:
            continue
        try:
            os.unlink(file, dir_fd=area_fd)
            removed += 1
        except FileNotFoundError:
            pass
        finally:
            os.close(area_fd)
    return removed


def prune_unused(store_fd: int, keep: set, min_age: float) -> int:
    """Delete saved binaries not in ``keep`` and older than ``min_age`` seconds (a collection may be about to
    refer to a newer one), and temporary files of killed copies; returns how many were deleted."""
    try:
        area_fd = open_dir(store_fd, BUILD_ID, create=False)
    except FileNotFoundError:
        return 0
    removed, now = 0, time.time()
    try:
        for directory in sorted(os.listdir(area_fd)):
            try:
                sub_fd = open_dir(area_fd, directory, create=False)
            except OSError:
                continue
            try:
                for name in os.listdir(sub_fd):
                    st = os.stat(name, dir_fd=sub_fd, follow_symlinks=False)
                    if (stat.S_ISREG(st.st_mode) and f"{directory}/{name}" not in keep
                            and now - st.st_mtime > min_age):
                        os.unlink(name, dir_fd=sub_fd)
                        removed += 1
            finally:
                os.close(sub_fd)
    finally:
        os.close(area_fd)
    return removed


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


def save(store_fd: int, store_path: str, held: HeldFiles, *, copy: bool, max_size: int, keep_free: int = 0,
         core_kept: bool = True) -> dict:
    """Describe every held file (build-id, size) and, if ``copy`` and the crash's core is kept, store it unless
    the crash's budget is spent or the copy would leave less than ``keep_free`` bytes free on the store's
    filesystem (binaries are only worth their room beside a core)."""
    result: dict = {"files": [], "saved_size": 0, "errors": list(held.errors)}
    area_fd = None
    try:
        for item in held.files:
            size = os.fstat(item.fd).st_size
            entry = {"path": item.path, "exe": item.exe, "build_id": elf.build_id(item.fd), "size": size,
                     "sha256": None, "stored": False, "reason": None}
            result["files"].append(entry)
            if not copy:
                entry["reason"] = "not saved for host processes (binaries_host = false)"
            elif not core_kept:
                entry["reason"] = "not saved: the core was not kept"
            elif entry["build_id"] is None:
                entry["reason"] = "no build-id"
            elif result["saved_size"] + size > max_size:
                entry["reason"] = f"over binaries_max_size ({max_size} bytes for this crash)"
            elif free_bytes(store_fd) - size < keep_free:
                entry["reason"] = f"would leave less than keep_free ({keep_free} bytes) free"
            else:
                try:
                    if area_fd is None:
                        area_fd = open_dir(store_fd, BUILD_ID)
                    _store(area_fd, f"{store_path.rstrip('/')}/{BUILD_ID}", item.fd, entry)
                    result["saved_size"] += size
                except OSError as exc:
                    entry["reason"] = f"save failed: {exc}"
                    result["errors"].append(f"{item.path}: {exc}")
    finally:
        if area_fd is not None:
            os.close(area_fd)
    return result


def _store(area_fd: int, area_path: str, fd: int, entry: dict) -> None:
    entry["sha256"] = _digest(fd, entry["size"])
    directory, name = stored_name(entry)
    sub_fd = open_dir(area_fd, directory)
    target = StoreDir(sub_fd, f"{area_path}/{directory}")
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
