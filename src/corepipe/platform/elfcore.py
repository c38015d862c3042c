"""How long an ELF core should be, from its own headers: a core that ends before that was cut short.

The kernel stops writing a core when the dumping process gets SIGKILL, and the pipe then
just ends; the only way to tell such a core from a whole one is to compare its length with
the end of its last segment (``p_offset + p_filesz``) in the program headers.
"""

from __future__ import annotations

import struct
from typing import Optional

_ET_CORE = 4
_PN_XNUM = 0xFFFF


def expected_size(head: bytes) -> Optional[int]:
    """The size the core announces, or None when ``head`` is not an ELF core or its headers are not all in it."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide:
        e_type, = struct.unpack_from(order + "H", head, 16)
        e_phoff, = struct.unpack_from(order + "Q", head, 32)
        e_phentsize, e_phnum = struct.unpack_from(order + "HH", head, 54)
        phdr, offsets = order + "IIQQQQQQ", (2, 5)
    else:
        e_type, = struct.unpack_from(order + "H", head, 16)
        e_phoff, = struct.unpack_from(order + "I", head, 28)
        e_phentsize, e_phnum = struct.unpack_from(order + "HH", head, 42)
        phdr, offsets = order + "IIIIIIII", (1, 4)
    if e_type != _ET_CORE or e_phnum in (0, _PN_XNUM) or e_phentsize < struct.calcsize(phdr):
        return None
    if e_phoff + e_phnum * e_phentsize > len(head):
        return None
    end = e_phoff + e_phnum * e_phentsize
    for i in range(e_phnum):
        fields = struct.unpack_from(phdr, head, e_phoff + i * e_phentsize)
        end = max(end, fields[offsets[0]] + fields[offsets[1]])
    return end


_PT_NOTE = 4
_NT_PRSTATUS = 1
_NT_SIGINFO = 0x53494749
#: e_machine -> offset of the program counter in the NT_PRSTATUS note (pr_reg starts at 112 on 64-bit Linux).
_PC_OFFSET = {62: 112 + 16 * 8,  # x86-64: rip is user_regs_struct's 17th register
              183: 112 + 32 * 8}  # aarch64: x0..x30, sp, pc


def crash_site(head: bytes) -> Optional[dict]:
    """``{pc, si_code, si_addr}`` of the thread that dumped (the kernel writes its NT_PRSTATUS first), from the
    notes in the first bytes of a 64-bit little-endian core; None when they are not all in ``head``, or the
    machine is not one whose register layout is known here (x86-64, aarch64). Values come from the crashed
    process: every offset is checked against ``head``."""
    try:
        return _crash_site(head)
    except struct.error:
        return None


def _crash_site(head: bytes) -> Optional[dict]:
    if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":
        return None
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    e_phoff, = struct.unpack_from("<Q", head, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    pc_at = _PC_OFFSET.get(e_machine)
    if e_type != _ET_CORE or pc_at is None or e_phentsize < 56 or e_phnum in (0, _PN_XNUM):
        return None
    site: dict = {"pc": None, "si_code": None, "si_addr": None}
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", head,
                                                                               e_phoff + i * e_phentsize)
        if p_type != _PT_NOTE:
            continue
        if p_offset + p_filesz > len(head):
            return None
        _notes(head[p_offset:p_offset + p_filesz], site, pc_at)
        break
    return site if site["pc"] is not None else None


def _notes(notes: bytes, site: dict, pc_at: int) -> None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        desc_at = pos + 12 + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if end > len(notes):
            return
        if kind == _NT_PRSTATUS and site["pc"] is None and descsz >= pc_at + 8:
            site["pc"], = struct.unpack_from("<Q", notes, desc_at + pc_at)
        elif kind == _NT_SIGINFO and site["si_code"] is None and descsz >= 24:
            site["si_code"], = struct.unpack_from("<i", notes, desc_at + 8)
            site["si_addr"], = struct.unpack_from("<Q", notes, desc_at + 16)
        if site["pc"] is not None and site["si_code"] is not None:
            return
        pos = end
