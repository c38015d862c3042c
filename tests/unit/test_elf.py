"""ELF headers: the expected length of a core, its type, and an executable's interpreter."""

from __future__ import annotations

import struct

from corepipe.platform import elf
from corepipe.platform.elf import expected_size


def core_header(segments: list, e_type: int = 4) -> bytes:
    """An ELF64 little-endian header and program headers; ``segments`` are (offset, filesz)."""
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", e_type, 62, 1, 0, 64, 0, 0, 64, 56, len(segments), 0, 0, 0)
    phdrs = b"".join(struct.pack("<IIQQQQQQ", 1, 4, off, 0, 0, size, size, 4096) for off, size in segments)
    return ehdr + phdrs


def test_the_end_of_the_last_segment() -> None:
    head = core_header([(4096, 100), (8192, 4096), (12288, 0)])
    assert expected_size(head) == 12288


def test_unknown_when_not_an_elf_core_or_headers_missing() -> None:
    assert expected_size(b"") is None
    assert expected_size(b"garbage" * 100) is None
    assert expected_size(core_header([(4096, 1)], e_type=2)) is None, "an executable, not a core"
    assert expected_size(core_header([(4096, 1), (8192, 1)])[:64 + 56]) is None, "program headers cut off"
    assert expected_size(core_header([])) is None


def test_core_type_and_interpreter(tmp_path) -> None:
    assert elf.is_core(core_header([(4096, 1)])) and not elf.is_core(core_header([(4096, 1)], e_type=2))
    assert not elf.is_core(b"\x7fELF" + bytes(12))
    with open("/bin/sh", "rb") as f:
        assert elf.has_interpreter(f.fileno()) is True
    static = tmp_path / "static"
    static.write_bytes(core_header([(4096, 1)], e_type=2))  # program headers of type PT_LOAD only
    with open(static, "rb") as f:
        assert elf.has_interpreter(f.fileno()) is False
    with open(__file__, "rb") as f:
        assert elf.has_interpreter(f.fileno()) is None and elf.build_id(f.fileno()) is None
