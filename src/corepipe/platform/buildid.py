"""The GNU build-id of an ELF file, read from its PT_NOTE segments.

The file comes from a crashed (possibly hostile) container, so every offset and size
is checked against the file and bounded before it is read; anything odd means "no build-id".
"""

from __future__ import annotations

import os
import struct
from typing import Optional

_PT_NOTE = 4
_NT_GNU_BUILD_ID = 3
_MAX_PHNUM = 4096
_MAX_NOTES = 1 << 16
_MAX_ID = 64


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ValueError("short read")
    return data


def read(fd: int) -> Optional[str]:
    """The build-id as lower-case hex, or None when the file is not an ELF file or has none."""
    try:
        return _read(fd)
    except (OSError, ValueError, struct.error):
        return None


def _read(fd: int) -> Optional[str]:
    ident = _pread(fd, 16, 0)
    if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return None
    wide = ident[4] == 2
    order = "<" if ident[5] == 1 else ">"
    if wide:
        phoff, = struct.unpack(order + "Q", _pread(fd, 8, 32))
        phentsize, phnum = struct.unpack(order + "HH", _pread(fd, 4, 54))
        entry = order + "IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz, memsz, align
    else:
        phoff, = struct.unpack(order + "I", _pread(fd, 4, 28))
        phentsize, phnum = struct.unpack(order + "HH", _pread(fd, 4, 42))
        entry = order + "IIIIIIII"  # type, offset, vaddr, paddr, filesz, memsz, flags, align
    if phentsize < struct.calcsize(entry) or phnum > _MAX_PHNUM:
        return None
    for i in range(phnum):
        fields = struct.unpack(entry, _pread(fd, struct.calcsize(entry), phoff + i * phentsize))
        if fields[0] != _PT_NOTE:
            continue
        offset, size = (fields[2], fields[5]) if wide else (fields[1], fields[4])
        found = _build_id_note(_pread(fd, min(size, _MAX_NOTES), offset), order)
        if found:
            return found
    return None


def _build_id_note(notes: bytes, order: str) -> Optional[str]:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from(order + "III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if end > len(notes):
            return None
        if kind == _NT_GNU_BUILD_ID and notes[name_at:name_at + namesz] == b"GNU\0" and 2 <= descsz <= _MAX_ID:
            return notes[desc_at:desc_at + descsz].hex()
        pos = end
    return None
