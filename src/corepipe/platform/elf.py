"""ELF headers, read one way for every use: a file's GNU build-id, a core's announced length, its type,
and whether an executable has a program interpreter.

The files and cores come from crashed (possibly hostile) processes, so every offset and size is
checked against what is there and bounded before it is read; anything odd means "don't know".
A core that ends before the end of its last segment (``p_offset + p_filesz``) was cut short: the
kernel stops writing a core when the dumping process gets SIGKILL, and the pipe then just ends.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

ET_EXEC, ET_DYN, ET_CORE = 2, 3, 4
PT_INTERP, PT_NOTE = 3, 4
_NT_PRSTATUS = 1
_PN_XNUM = 0xFFFF
_NT_GNU_BUILD_ID = 3
_MAX_PHNUM = 4096
_MAX_NOTES = 1 << 16
_MAX_ID = 64

#: ``read(size, offset)`` returns exactly ``size`` bytes or raises ValueError.
Reader = Callable[[int, int], bytes]


@dataclass
class Header:
    wide: bool
    order: str
    e_type: int
    phoff: int
    phentsize: int
    phnum: int

    @property
    def phdr(self) -> str:
        # 64-bit: type, flags, offset, vaddr, paddr, filesz, memsz, align; 32-bit: type, offset, vaddr, paddr,
        # filesz, memsz, flags, align.
        return self.order + ("IIQQQQQQ" if self.wide else "IIIIIIII")


def bytes_reader(data: bytes) -> Reader:
    def read(size: int, offset: int) -> bytes:
        if offset < 0 or offset + size > len(data):
            raise ValueError("beyond the data")
        return bytes(data[offset:offset + size])
    return read


def fd_reader(fd: int) -> Reader:
    def read(size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError("short read")
        return data
    return read


def header(read: Reader) -> Optional[Header]:
    """The ELF header's fields that locate the program headers; None if this is not ELF."""
    try:
        ident = read(16, 0)
        if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        e_type, = struct.unpack(order + "H", read(2, 16))
        phoff, = struct.unpack(order + ("Q" if wide else "I"), read(8, 32) if wide else read(4, 28))
        phentsize, phnum = struct.unpack(order + "HH", read(4, 54 if wide else 42))
    except (OSError, ValueError, struct.error):
        return None
    return Header(wide, order, e_type, phoff, phentsize, phnum)


def segments(hdr: Header, read: Reader) -> Iterator[tuple]:
    """(p_type, p_offset, p_filesz) of each program header; stops (ValueError) where they cannot be read."""
    size = struct.calcsize(hdr.phdr)
    if hdr.phentsize < size or hdr.phnum in (0, _PN_XNUM) or hdr.phnum > _MAX_PHNUM:
        return
    offsets = (2, 5) if hdr.wide else (1, 4)
    for i in range(hdr.phnum):
        fields = struct.unpack(hdr.phdr, read(size, hdr.phoff + i * hdr.phentsize))
        yield fields[0], fields[offsets[0]], fields[offsets[1]]


def build_id(fd: int) -> Optional[str]:
    """The GNU build-id of the file ``fd`` as lower-case hex, from its PT_NOTE segments; None when the file is
    not ELF or has none."""
    read = fd_reader(fd)
    hdr = header(read)
    if hdr is None:
        return None
    try:
        for p_type, offset, size in segments(hdr, read):
            if p_type == PT_NOTE:
                found = _build_id_note(os.pread(fd, min(size, _MAX_NOTES), offset), hdr.order)
                if found:
                    return found
    except (OSError, ValueError, struct.error):
        return None
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


def is_core(head: bytes) -> bool:
    hdr = header(bytes_reader(head))
    return hdr is not None and hdr.e_type == ET_CORE


def expected_size(head: bytes) -> Optional[int]:
    """The size the core announces, or None when ``head`` is not an ELF core or its headers are not all in it."""
    read = bytes_reader(head)
    hdr = header(read)
    if hdr is None or hdr.e_type != ET_CORE or len(head) < 64:
        return None
    try:
        found = list(segments(hdr, read))
    except (ValueError, struct.error):
        return None
    if not found:
        return None
    return max([hdr.phoff + hdr.phnum * hdr.phentsize] + [offset + size for _type, offset, size in found])


def signal_number(head: bytes) -> Optional[int]:
    """The fatal signal (``si_signo`` of the first NT_PRSTATUS note, the dumping thread's), or None when
    the notes are not in ``head``: socket mode passes no ``%s``, the core says it."""
    read = bytes_reader(head)
    hdr = header(read)
    if hdr is None or hdr.e_type != ET_CORE:
        return None
    try:
        for p_type, offset, size in segments(hdr, read):
            if p_type != PT_NOTE:
                continue
            at, stop = offset, min(offset + size, len(head))
            while at + 12 <= stop:
                namesz, descsz, n_type = struct.unpack_from(hdr.order + "III", head, at)
                desc = at + 12 + ((namesz + 3) & ~3)
                if n_type == _NT_PRSTATUS and desc + 4 <= stop:
                    return struct.unpack_from(hdr.order + "i", head, desc)[0]
                at = desc + ((descsz + 3) & ~3)
    except (ValueError, struct.error):
        return None
    return None


def has_interpreter(fd: int) -> Optional[bool]:
    """Whether an ELF executable names a program interpreter (PT_INTERP); None if unreadable or not ELF."""
    read = fd_reader(fd)
    hdr = header(read)
    if hdr is None:
        return None
    try:
        return any(p_type == PT_INTERP for p_type, _offset, _size in segments(hdr, read))
    except (OSError, ValueError, struct.error):
        return None
