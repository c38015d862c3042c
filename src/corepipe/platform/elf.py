"""ELF headers, read one way for every use: a file's GNU build-id, a core's announced length, its type,
its fatal signal and crash site (from its notes), and whether an executable has a program interpreter.

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
_NT_SIGINFO = 0x53494749
_PN_XNUM = 0xFFFF
_NT_GNU_BUILD_ID = 3
#: e_machine -> offset of the program counter in an NT_PRSTATUS note (pr_reg starts at 112 on 64-bit Linux).
_PC_OFFSET = {62: 112 + 16 * 8,  # x86-64: rip is user_regs_struct's 17th register
              183: 112 + 32 * 8}  # aarch64: x0..x30, sp, pc
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
    machine: int
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
        e_type, machine = struct.unpack(order + "HH", read(4, 16))
        phoff, = struct.unpack(order + ("Q" if wide else "I"), read(8, 32) if wide else read(4, 28))
        phentsize, phnum = struct.unpack(order + "HH", read(4, 54 if wide else 42))
    except (OSError, ValueError, struct.error):
        return None
    return Header(wide, order, e_type, machine, phoff, phentsize, phnum)


def segments(hdr: Header, read: Reader) -> Iterator[tuple]:
    """(p_type, p_offset, p_filesz) of each program header; stops (ValueError) where they cannot be read."""
    size = struct.calcsize(hdr.phdr)
    if hdr.phentsize < size or hdr.phnum in (0, _PN_XNUM) or hdr.phnum > _MAX_PHNUM:
        return
    offsets = (2, 5) if hdr.wide else (1, 4)
    for i in range(hdr.phnum):
        fields = struct.unpack(hdr.phdr, read(size, hdr.phoff + i * hdr.phentsize))
        yield fields[0], fields[offsets[0]], fields[offsets[1]]


def notes(data: bytes, order: str) -> Iterator[tuple]:
    """(n_type, name, desc) of each note in ``data`` (a PT_NOTE segment's bytes, or the part of it that was
    read), up to the first that does not fit: the one walk over notes for build-ids, signals and crash sites."""
    view = memoryview(data)
    pos = 0
    while pos + 12 <= len(view):
        namesz, descsz, kind = struct.unpack_from(order + "III", view, pos)
        desc_at = pos + 12 + ((namesz + 3) & ~3)
        if desc_at + descsz > len(view):
            return
        yield kind, bytes(view[pos + 12:pos + 12 + namesz]), view[desc_at:desc_at + descsz]
        pos = desc_at + ((descsz + 3) & ~3)


def build_id(fd: int) -> Optional[str]:
    """The GNU build-id of the file ``fd`` as lower-case hex, from its PT_NOTE segments; None when the file is
    not ELF or has none."""
    read = fd_reader(fd)
    hdr = header(read)
    if hdr is None:
        return None
    try:
        for p_type, offset, size in segments(hdr, read):
            if p_type != PT_NOTE:
                continue
            for kind, name, desc in notes(os.pread(fd, min(size, _MAX_NOTES), offset), hdr.order):
                if kind == _NT_GNU_BUILD_ID and name == b"GNU\0" and 2 <= len(desc) <= _MAX_ID:
                    return desc.hex()
    except (OSError, ValueError, struct.error):
        return None
    return None


def _core_notes(head: bytes) -> Iterator[tuple]:
    """(header, n_type, desc) of each note of a core that is in ``head``; nothing if ``head`` is not a core."""
    read = bytes_reader(head)
    hdr = header(read)
    if hdr is None or hdr.e_type != ET_CORE:
        return
    try:
        for p_type, offset, size in segments(hdr, read):
            if p_type == PT_NOTE:
                for kind, _name, desc in notes(head[offset:min(offset + size, len(head))], hdr.order):
                    yield hdr, kind, desc
    except (ValueError, struct.error):
        return


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
    for hdr, kind, desc in _core_notes(head):
        if kind == _NT_PRSTATUS and len(desc) >= 4:
            return struct.unpack_from(hdr.order + "i", desc)[0]
    return None


def crash_site(head: bytes) -> Optional[dict]:
    """``{pc, si_code, si_addr}`` of the thread that dumped (the kernel writes its NT_PRSTATUS first, and one
    NT_SIGINFO), from the notes in ``head``; None when its NT_PRSTATUS is not there or the machine is not one
    whose register layout is known here (64-bit x86-64, aarch64)."""
    site: dict = {"pc": None, "si_code": None, "si_addr": None}
    for hdr, kind, desc in _core_notes(head):
        pc_at = _PC_OFFSET.get(hdr.machine) if hdr.wide else None
        if pc_at is None:
            return None
        if kind == _NT_PRSTATUS and site["pc"] is None and len(desc) >= pc_at + 8:
            site["pc"], = struct.unpack_from(hdr.order + "Q", desc, pc_at)
        elif kind == _NT_SIGINFO and site["si_code"] is None and len(desc) >= 24:
            site["si_code"], = struct.unpack_from(hdr.order + "i", desc, 8)
            site["si_addr"], = struct.unpack_from(hdr.order + "Q", desc, 16)
        if site["pc"] is not None and site["si_code"] is not None:
            break
    return site if site["pc"] is not None else None


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
