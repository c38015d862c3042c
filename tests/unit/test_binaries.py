"""build-id parsing, holding and saving a process's mapped files, the debug sysroot, pruning on rm."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

from support import need

from corepipe.domain import binaries
from corepipe.platform import capture, elf, sysroot
from corepipe.platform.store import BUILD_ID, Store


def _readelf_build_id(path: Path) -> str:
    readelf = shutil.which("readelf")
    need(readelf is not None, "needs readelf (binutils)")
    out = subprocess.run([readelf, "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", out).group(1)


def _build_id(path: Path) -> object:
    with open(path, "rb") as f:
        return elf.build_id(f.fileno())


def test_build_id_matches_readelf(crasher: Path, tmp_path: Path) -> None:
    assert _build_id(crasher) == _readelf_build_id(crasher)
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    need(libc.exists(), f"needs {libc} (a shared library with a build id)")
    assert _build_id(libc) == _readelf_build_id(libc)


def test_build_id_of_odd_files(crasher: Path, tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_text("#!/bin/sh\n")
    assert _build_id(text) is None
    cut = tmp_path / "cut"
    cut.write_bytes(crasher.read_bytes()[:100])
    assert _build_id(cut) is None
    # A note whose size runs past its segment: no build-id, no exception.
    data = bytearray(crasher.read_bytes())
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        at = phoff + i * phentsize
        if struct.unpack_from("<I", data, at)[0] == 4:  # PT_NOTE
            offset = struct.unpack_from("<Q", data, at + 8)[0]
            struct.pack_into("<I", data, offset + 4, 0x7FFFFFFF)  # descsz
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    assert _build_id(bad) is None


def test_mapped_files() -> None:
    maps = ("55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234 /app/bin/my server\n"
            "55d0c0a01000-55d0c0a02000 r-xp 00001000 fd:01 1234 /app/bin/my server\n"
            "7f0000000000-7f0000001000 r--p 00000000 fd:01 99 /lib/libc.so.6 (deleted)\n"
            "7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n"
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n")
    assert capture.mapped_files(maps) == [("55d0c0a00000-55d0c0a01000", "/app/bin/my server", "253:1"),
                                           ("7f0000000000-7f0000001000", "/lib/libc.so.6 (deleted)", "253:1")]
    # A static executable's first mapping: maps pads the address to 8 digits, map_files does not.
    static = "00400000-00401000 r--p 00000000 fd:01 7 /crasher\n00401000-00480000 r-xp 00001000 fd:01 7 /crasher\n"
    assert capture.mapped_files(static) == [("400000-401000", "/crasher", "253:1")]


def test_sysroot_paths_stay_inside(tmp_path: Path) -> None:
    assert sysroot.relative("/lib/libc.so.6 (deleted)") == "lib/libc.so.6"
    for bad in ("lib/x", "/../etc/passwd", "/a/./b", "//x", "/a/\0b"):
        assert sysroot.relative(bad) is None, bad
    root = tmp_path / "root"
    root.mkdir()
    made = sysroot.build(str(root), [("/lib/a.so", "/t/a"), ("/../x", "/t/x"), ("/lib/a.so/b", "/t/b")])
    assert made == {"/lib/a.so": str(root / "lib/a.so")}
    assert os.readlink(root / "lib/a.so") == "/t/a" and list(tmp_path.iterdir()) == [root]


def _hold_self() -> binaries.HeldFiles:
    need(os.geteuid() == 0, "needs root to open /proc/<pid>/map_files")
    dir_fd = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries: list = []
        errors: list = []
        capture.open_mapped(dir_fd, Path("/proc/self/maps").read_text(), os.readlink("/proc/self/exe"), entries,
                            errors, capture.local_devices(b"", True))
        return binaries.held(entries, errors)
    finally:
        os.close(dir_fd)


def test_save_dedups_and_respects_the_limit(tmp_path: Path) -> None:
    held = _hold_self()
    try:
        assert held.files[0].exe and held.files[0].path == os.path.realpath("/proc/self/exe")
        with Store(str(tmp_path / "store")) as store:
            first = binaries.save(store.fd, store.root, held, copy=True, max_size=1 << 40)
            again = binaries.save(store.fd, store.root, held, copy=True, max_size=1 << 40)
            smallest = min(e["size"] for e in first["files"] if e["build_id"])
            limited = binaries.save(store.fd, store.root, held, copy=True, max_size=smallest)
            host = binaries.save(store.fd, store.root, held, copy=False, max_size=1 << 40)
    finally:
        held.close()
    saved = [e for e in first["files"] if e["stored"]]
    assert saved and all(e["build_id"] for e in saved)
    assert [e["sha256"] for e in again["files"]] == [e["sha256"] for e in first["files"]]
    area = tmp_path / "store" / BUILD_ID
    stored = sorted(p for p in area.rglob("*") if p.is_file())
    assert len(stored) == len(saved)  # the second save added nothing
    for entry in saved:
        copy = area.joinpath(*binaries.stored_name(entry))
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == entry["sha256"]
        assert copy.stat().st_mode & 0o777 == 0o600
    assert limited["saved_size"] <= smallest and any("binaries_max_size" in (e["reason"] or "")
                                                      for e in limited["files"])
    assert not any(e["stored"] for e in host["files"])


def test_prune_keeps_referenced_and_recent(tmp_path: Path) -> None:
    area = tmp_path / BUILD_ID / "ab"
    area.mkdir(parents=True)
    keep, old, recent = area / "cd-1", area / "cd-2", area / "cd-3"
    for path in (keep, old, recent):
        path.write_bytes(b"x")
    os.utime(keep, (1, 1))
    os.utime(old, (1, 1))
    with Store(str(tmp_path)) as store:
        assert binaries.prune_unused(store.fd, {"ab/cd-1"}, 3600) == 1
    assert keep.exists() and not old.exists() and recent.exists()


def test_save_leaves_keep_free(tmp_path: Path) -> None:
    held = _hold_self()
    try:
        with Store(str(tmp_path / "store")) as store:
            st = os.statvfs(store.root)
            free = st.f_bavail * st.f_frsize
            refused = binaries.save(store.fd, store.root, held, copy=True, max_size=1 << 40, keep_free=free)
            allowed = binaries.save(store.fd, store.root, held, copy=True, max_size=1 << 40, keep_free=0)
    finally:
        held.close()
    with_id = [e for e in refused["files"] if e["build_id"]]
    assert with_id and not any(e["stored"] for e in with_id)
    assert all("keep_free" in e["reason"] for e in with_id)
    assert any(e["stored"] for e in allowed["files"])
