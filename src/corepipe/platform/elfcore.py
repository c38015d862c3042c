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
