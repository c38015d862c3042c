"""ELF headers and notes: the expected length of a core, its type, signal and crash site, build-ids, interpreters."""

from __future__ import annotations

import struct
import subprocess

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


#: Three compile units made by hand: the directory through DW_FORM_strx1 and DW_AT_str_offsets_base (as clang
#: writes it), inline (DW_FORM_string), and a relative one, which names no place on the host.
UNITS_ASM = r"""
.globl _start
.text
_start: ret
.section .debug_abbrev,"",@progbits
abbrevs:
.uleb128 1; .uleb128 0x11; .byte 0; .uleb128 0x72; .uleb128 0x17; .uleb128 0x1b; .uleb128 0x25; .uleb128 0; .uleb128 0
.uleb128 2; .uleb128 0x11; .byte 0; .uleb128 0x13; .uleb128 0x0b; .uleb128 0x1b; .uleb128 0x08; .uleb128 0; .uleb128 0
.uleb128 0
.section .debug_info,"",@progbits
.long 1f - 0f
0: .value 5; .byte 1; .byte 8; .long abbrevs
.uleb128 1; .long offsets; .byte 1
1: .long 1f - 0f
0: .value 5; .byte 1; .byte 8; .long abbrevs
.uleb128 2; .byte 12; .asciz "/inline/dir"
1: .long 1f - 0f
0: .value 4; .long abbrevs; .byte 8
.uleb128 2; .byte 12; .asciz "relative/dir"
1:
.section .debug_str_offsets,"",@progbits
.long 1f - 0f
0: .value 5; .value 0
offsets: .long other; .long hand
1:
.section .debug_str,"MS",@progbits,1
other: .asciz "/not/this/one"
hand: .asciz "/hand/made/dir"
"""


def _gcc(tmp_path, name: str, *args: str) -> bytes:
    from support import need_tool

    subprocess.run([need_tool("gcc"), *args, "-o", str(tmp_path / name)], cwd=tmp_path, check=True,
                   capture_output=True)
    return (tmp_path / name).read_bytes()


def _dirs(tmp_path, data: bytes) -> list:
    path = tmp_path / "elf"
    path.write_bytes(data)
    with open(path, "rb") as f:
        return elf.compile_dirs(f.fileno())


def test_compile_dirs_as_gcc_writes_them(tmp_path) -> None:
    """DWARF 2 to 5, 64-bit DWARF, zlib-compressed sections, a split-DWARF skeleton; two units, two directories."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "main.c").write_text("int f(void);\nint main(void) { return f(); }\n")
    (tmp_path / "b" / "f.c").write_text("int f(void) { return 0; }\n")
    for flags in ([], ["-gdwarf-2"], ["-gdwarf-4"], ["-gdwarf64"], ["-gz=zlib"], ["-gsplit-dwarf"]):
        _gcc(tmp_path / "a", "main.o", "-g", *flags, "-c", "main.c")
        _gcc(tmp_path / "b", "f.o", "-g", *flags, "-c", "f.c")
        data = _gcc(tmp_path, "prog", *flags, "a/main.o", "b/f.o")  # the linker keeps -gz's compression
        assert _dirs(tmp_path, data) == [str(tmp_path / "a"), str(tmp_path / "b")], flags
    _gcc(tmp_path, "stripped", "-s", "a/main.o", "b/f.o")
    assert _dirs(tmp_path, (tmp_path / "stripped").read_bytes()) == []


def test_compile_dirs_through_string_offsets(tmp_path) -> None:
    (tmp_path / "units.s").write_text(UNITS_ASM)
    data = _gcc(tmp_path, "units", "-nostdlib", "-static", "units.s")
    assert _dirs(tmp_path, data) == ["/hand/made/dir", "/inline/dir"]


def test_compile_dirs_of_damaged_files_end_quietly(tmp_path) -> None:
    """Cut anywhere or with bytes changed anywhere in its DWARF or section table: a list, never an exception."""
    import random

    (tmp_path / "units.s").write_text(UNITS_ASM)
    good = _gcc(tmp_path, "units", "-nostdlib", "-static", "units.s")
    assert _dirs(tmp_path, b"") == [] and _dirs(tmp_path, b"not an ELF file" * 100) == []
    for size in range(0, len(good), 7):
        assert isinstance(_dirs(tmp_path, good[:size]), list)
    rand = random.Random(31)
    for _ in range(2000):
        damaged = bytearray(good)
        for _ in range(rand.randint(1, 8)):
            damaged[rand.randrange(len(damaged))] = rand.randrange(256)
        found = _dirs(tmp_path, bytes(damaged))
        assert isinstance(found, list) and len(found) <= elf._MAX_DIRS
        assert all(isinstance(d, str) and d.startswith("/") and len(d) < elf._MAX_PATH for d in found)
