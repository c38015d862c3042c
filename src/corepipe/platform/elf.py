"""ELF headers, read one way for every use: a file's GNU build-id, a core's announced length, its type,
its fatal signal and crash site (from its notes), whether an executable has a program interpreter, and
the directories its compile units were built in (DWARF's DW_AT_comp_dir, where ``debug`` finds sources).

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
        if not 0 <= offset < (1 << 62) or size < 0:  # a 64-bit field's offset would overflow pread's off_t
            raise ValueError("beyond any file")
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



_SHF_COMPRESSED, _ELFCOMPRESS_ZLIB = 0x800, 1
_MAX_SECTIONS = 1 << 16
_MAX_SECTION_NAMES = 1 << 20
_MAX_INFLATED = 16 << 20  # a compressed section is inflated up to this much (the first units are enough)
#: The sections read for compile directories.
_DWARF_SECTIONS = (".debug_info", ".debug_abbrev", ".debug_str", ".debug_line_str", ".debug_str_offsets")
_MAX_UNITS = 4096
_MAX_DIRS = 16
_MAX_ABBREVS = 1 << 16  # bytes of an abbreviation table searched for a unit's first entry
_MAX_DIE = 4096  # bytes of a unit's first entry
_MAX_PATH = 4096
_DW_AT_COMP_DIR, _DW_AT_STR_OFFSETS_BASE = 0x1B, 0x72
_DW_FORM_STRING, _DW_FORM_STRP, _DW_FORM_LINE_STRP = 0x08, 0x0E, 0x1F
_DW_FORM_INDIRECT, _DW_FORM_SEC_OFFSET, _DW_FORM_IMPLICIT_CONST = 0x16, 0x17, 0x21
_DW_FORM_STRX = {0x1A: 0, 0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4, 0x1F02: 0}  # byte size, 0: ULEB128
#: Forms whose size is fixed: byte size, or "addr" / "offset" (the unit's address or offset size).
_FIXED = {0x01: "addr", 0x05: 2, 0x06: 4, 0x07: 8, 0x0B: 1, 0x0C: 1, 0x0E: "offset", 0x10: "ref_addr", 0x11: 1,
          0x12: 2, 0x13: 4, 0x14: 8, 0x17: "offset", 0x19: 0, 0x1C: 4, 0x1D: "offset", 0x1E: 16, 0x1F: "offset",
          0x20: 8, 0x21: 0, 0x24: 8, 0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4, 0x29: 1, 0x2A: 2, 0x2B: 3, 0x2C: 4,
          0x1F20: "offset", 0x1F21: "offset"}
_LEB = {0x0D, 0x0F, 0x15, 0x1A, 0x1B, 0x22, 0x23, 0x1F01, 0x1F02}  # 0x0D's SLEB128 is skipped the same way
_BLOCK = {0x03: 2, 0x04: 4, 0x09: 0, 0x0A: 1, 0x18: 0}  # its length's byte size, 0: ULEB128


@dataclass
class _Section:
    read: Reader
    size: int

    def head(self, at: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``at``: fewer where the section ends first."""
        if not 0 <= at < self.size:
            raise ValueError("beyond the section")
        return self.read(min(limit, self.size - at), at)


class _Cursor:
    """Reads DWARF's fields from ``data``; IndexError past its end."""

    def __init__(self, data: bytes, order: str):
        self.data, self.order, self.pos = data, "big" if order == ">" else "little", 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise IndexError("beyond the data")
        self.pos += size
        return self.data[self.pos - size:self.pos]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), self.order)

    def leb(self) -> int:
        value = shift = 0
        while shift < 64:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise IndexError("LEB128 too long")

    def cstring(self) -> bytes:
        end = self.data.index(b"\0", self.pos)  # ValueError without one
        text, self.pos = self.data[self.pos:end], end + 1
        return text


def _sections(hdr: Header, read: Reader) -> dict:
    """name -> _Section of each of the _DWARF_SECTIONS there (a zlib-compressed one inflated, bounded)."""
    if hdr.wide:
        shoff, = struct.unpack(hdr.order + "Q", read(8, 40))
        entsize, count, names_at = struct.unpack(hdr.order + "HHH", read(6, 58))
        layout = hdr.order + "IIQQQQIIQQ"
    else:
        shoff, = struct.unpack(hdr.order + "I", read(4, 32))
        entsize, count, names_at = struct.unpack(hdr.order + "HHH", read(6, 46))
        layout = hdr.order + "IIIIIIIIII"
    if entsize < struct.calcsize(layout) or not 0 < count <= _MAX_SECTIONS or names_at >= count:
        return {}
    table = [struct.unpack(layout, read(struct.calcsize(layout), shoff + i * entsize)) for i in range(count)]
    names = _Cursor(read(min(table[names_at][5], _MAX_SECTION_NAMES), table[names_at][4]), hdr.order)
    found: dict = {}
    for name_at, _type, flags, _addr, offset, size, *_rest in table:
        names.pos = name_at
        try:
            name = names.cstring().decode("ascii", "replace")
        except (IndexError, ValueError):
            continue
        if name in _DWARF_SECTIONS and name not in found:
            found[name] = _section(hdr, read, flags, offset, size)
    return found


def _section(hdr: Header, read: Reader, flags: int, offset: int, size: int) -> _Section:
    if not flags & _SHF_COMPRESSED:
        def within(length: int, at: int) -> bytes:
            if at < 0 or at + length > size:
                raise ValueError("beyond the section")
            return read(length, offset + at)
        return _Section(within, size)
    import zlib  # only here: the collect path never reads DWARF

    head = 24 if hdr.wide else 12
    kind, = struct.unpack(hdr.order + "I", read(4, offset))
    if kind != _ELFCOMPRESS_ZLIB or size <= head:
        return _Section(bytes_reader(b""), 0)  # zstd-compressed DWARF: not read here
    try:
        data = zlib.decompressobj().decompress(read(min(size - head, _MAX_INFLATED), offset + head), _MAX_INFLATED)
    except zlib.error:
        data = b""
    return _Section(bytes_reader(data), len(data))


def _string(section: Optional[_Section], offset: int) -> Optional[bytes]:
    """The NUL-terminated string at ``offset`` of a string section, if it ends within _MAX_PATH bytes."""
    if section is None:
        return None
    data = section.head(offset, _MAX_PATH)
    return data.split(b"\0", 1)[0] if b"\0" in data else None


def _abbreviation(table: bytes, order: str, code: int) -> Optional[list]:
    """[(attribute, form)] of abbreviation ``code`` in (the first bytes of) an abbreviation table."""
    cur = _Cursor(table, order)
    while True:
        found = cur.leb()
        if found == 0:
            return None
        cur.leb()  # tag
        cur.take(1)  # has children
        specs = []
        while True:
            name, form = cur.leb(), cur.leb()
            if name == 0 and form == 0:
                break
            if form == _DW_FORM_IMPLICIT_CONST:
                cur.leb()  # its value is here, not in the entry
            specs.append((name, form))
        if found == code:
            return specs


def _unit_dir(cur: _Cursor, specs: list, sizes: dict, sections: dict) -> Optional[bytes]:
    """The compile directory in a unit's first entry (at ``cur``), read through its abbreviation ``specs``."""
    value, base, index = None, None, None
    for name, spec_form in specs:
        form = cur.leb() if spec_form == _DW_FORM_INDIRECT else spec_form
        if name == _DW_AT_COMP_DIR and form == _DW_FORM_STRING:
            value = cur.cstring()
        elif name == _DW_AT_COMP_DIR and form in (_DW_FORM_STRP, _DW_FORM_LINE_STRP):
            where = ".debug_str" if form == _DW_FORM_STRP else ".debug_line_str"
            value = _string(sections.get(where), cur.uint(sizes["offset"]))
        elif name == _DW_AT_COMP_DIR and form in _DW_FORM_STRX:
            index = cur.uint(_DW_FORM_STRX[form]) if _DW_FORM_STRX[form] else cur.leb()
        elif name == _DW_AT_STR_OFFSETS_BASE and form == _DW_FORM_SEC_OFFSET:
            base = cur.uint(sizes["offset"])
        elif form in _FIXED:
            cur.take(sizes.get(_FIXED[form], _FIXED[form]))
        elif form in _LEB:
            cur.leb()
        elif form in _BLOCK:
            cur.take(cur.uint(_BLOCK[form]) if _BLOCK[form] else cur.leb())
        elif form == _DW_FORM_STRING:
            cur.cstring()
        else:
            break  # a form not known here: the rest of the entry cannot be walked
    offsets = sections.get(".debug_str_offsets")
    if value is None and index is not None and offsets is not None:
        size = sizes["offset"]
        at = (base if base is not None else 2 * size) + index * size  # past the table's header by default
        value = _string(sections.get(".debug_str"), int.from_bytes(offsets.read(size, at), cur.order))
    return value


def _unit(info: _Section, abbrevs: _Section, at: int, order: str, sections: dict) -> tuple:
    """(the compile directory of the unit at ``at`` or None, where the next unit starts)."""
    cur = _Cursor(info.head(at, 32), order)
    length, offset_size = cur.uint(4), 4
    if length == 0xFFFFFFFF:
        length, offset_size = cur.uint(8), 8
    elif length >= 0xFFFFFFF0:
        raise ValueError("reserved unit length")
    end = at + cur.pos + length
    version = cur.uint(2)
    if version >= 5:
        unit_type, address_size, abbrev_at = cur.uint(1), cur.uint(1), cur.uint(offset_size)
        if unit_type not in (1, 4, 5):  # compile, skeleton and split compile units name a directory
            return None, end
        cur.take(8 if unit_type != 1 else 0)  # their dwo_id
    elif version >= 2:
        abbrev_at, address_size = cur.uint(offset_size), cur.uint(1)
    else:
        raise ValueError(f"DWARF version {version}")
    entry = _Cursor(info.head(at + cur.pos, min(_MAX_DIE, max(0, end - at - cur.pos))), order)
    code = entry.leb()
    specs = _abbreviation(abbrevs.head(abbrev_at, _MAX_ABBREVS), order, code) if code else None
    sizes = {"addr": address_size, "offset": offset_size,
             "ref_addr": address_size if version == 2 else offset_size}
    return (_unit_dir(entry, specs, sizes, sections) if specs else None), end


def compile_dirs(fd: int) -> list:
    """The distinct absolute DW_AT_comp_dir of the compile units of the ELF file ``fd`` (at most _MAX_DIRS, from
    the first _MAX_UNITS units), in their order: where a program was built, so where its sources may still be.
    Empty when the file is not ELF or has no DWARF; a malformed unit ends the walk with what was found."""
    read = fd_reader(fd)
    hdr = header(read)
    found: list = []
    try:
        sections = _sections(hdr, read) if hdr is not None else {}
        info, abbrevs = sections.get(".debug_info"), sections.get(".debug_abbrev")
        at = 0
        for _ in range(_MAX_UNITS if info and abbrevs else 0):
            if at >= info.size:
                break
            value, at = _unit(info, abbrevs, at, hdr.order, sections)
            path = os.fsdecode(value) if value else None
            if path and path.startswith("/") and path not in found:
                found.append(path)
                if len(found) >= _MAX_DIRS:
                    break
    except (OSError, ValueError, IndexError, struct.error):
        pass  # what was found before the damage
    return found
