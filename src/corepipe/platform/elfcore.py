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
_PT_NOTE = 4
_NT_PRSTATUS = 1


def _segments(head: bytes) -> Optional[tuple]:
    """(byte order, program headers end, [(p_type, p_offset, p_filesz), ...]) of an ELF core, or None when
    ``head`` is not one or its headers are not all in it."""
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
    segments = []
    for i in range(e_phnum):
        fields = struct.unpack_from(phdr, head, e_phoff + i * e_phentsize)
        segments.append((fields[0], fields[offsets[0]], fields[offsets[1]]))
    return order, e_phoff + e_phnum * e_phentsize, segments


def expected_size(head: bytes) -> Optional[int]:
    """The size the core announces, or None when ``head`` is not an ELF core or its headers are not all in it."""
    parsed = _segments(head)
    if parsed is None:
        return None
    _order, end, segments = parsed
    return max([end] + [offset + size for _type, offset, size in segments])


def signal_number(head: bytes) -> Optional[int]:
    """The fatal signal (``si_signo`` of the first NT_PRSTATUS note, the dumping thread's), or None when
    the notes are not in ``head``: socket mode passes no ``%s``, the core says it."""
    parsed = _segments(head)
    if parsed is None:
        return None
    order, _end, segments = parsed
    for p_type, offset, size in segments:
        if p_type != _PT_NOTE:
            continue
        at, stop = offset, min(offset + size, len(head))
        while at + 12 <= stop:
            namesz, descsz, n_type = struct.unpack_from(order + "III", head, at)
            desc = at + 12 + _align4(namesz)
            if n_type == _NT_PRSTATUS and desc + 4 <= stop:
                return struct.unpack_from(order + "i", head, desc)[0]
            at = desc + _align4(descsz)
    return None


def _align4(n: int) -> int:
    return (n + 3) & ~3
