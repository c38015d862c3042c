"""ELF headers and notes: the expected length of a core, its type, signal and crash site, build-ids, interpreters."""

from __future__ import annotations

import struct

from corepipe.platform import elf
from corepipe.platform.elf import expected_size


def core_header(segments: list, e_type: int = 4, p_type: int = 1) -> bytes:
    """An ELF64 little-endian header and program headers (PT_LOAD unless ``p_type``); ``segments`` are
    (offset, filesz)."""
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", e_type, 62, 1, 0, 64, 0, 0, 64, 56, len(segments), 0, 0, 0)
    phdrs = b"".join(struct.pack("<IIQQQQQQ", p_type, 4, off, 0, 0, size, size, 4096) for off, size in segments)
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


def note(kind: int, name: bytes, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def test_one_note_walk_for_build_id_signal_and_crash_site(tmp_path) -> None:
    prstatus = bytearray(112 + 27 * 8)
    struct.pack_into("<i", prstatus, 0, 11)  # si_signo
    struct.pack_into("<Q", prstatus, 112 + 16 * 8, 0x401136)  # rip
    siginfo = struct.pack("<iiiiQ", 11, 0, 1, 0, 0x10) + bytes(104)
    notes = note(1, b"CORE\0", bytes(prstatus)) + note(0x53494749, b"CORE\0", siginfo)
    head = core_header([(64 + 56, len(notes))], p_type=4) + notes
    assert [kind for kind, _name, _desc in elf.notes(notes, "<")] == [1, 0x53494749]
    assert list(elf.notes(notes[:-1], "<"))[-1][0] == 1, "a note that does not fit whole ends the walk"
    assert elf.signal_number(head) == 11
    assert elf.crash_site(head) == {"pc": 0x401136, "si_code": 1, "si_addr": 0x10}
    assert elf.crash_site(head[:64 + 56 + 20]) is None, "its NT_PRSTATUS is not in the head"
    exe = tmp_path / "exe"
    exe.write_bytes(core_header([(64 + 56, 36)], e_type=2, p_type=4) + note(3, b"GNU\0", bytes.fromhex("ab" * 20)))
    with open(exe, "rb") as f:
        assert elf.build_id(f.fileno()) == "ab" * 20
