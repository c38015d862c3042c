"""The signature rules on given frames, the frames line of gdb's output, the crash site in a real core, grouping."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import HERE, need, need_tool

from corepipe.domain import backtrace, signature
from corepipe.platform import elf

MAPS = ("00400000-00401000 r--p 00000000 08:01 11 /app/server\n"
        "00401000-00480000 r-xp 00001000 08:01 11 /app/server\n"
        "7f0000000000-7f0000028000 r--p 00000000 08:01 12 /usr/lib/libc.so.6\n"
        "7f0000028000-7f00001bd000 r-xp 00028000 08:01 12 /usr/lib/libc.so.6\n"
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]\n")
MODULES = signature.Modules(MAPS, {"/app/server": "ab" * 20}, "/app/server")
REC = {"exe": "/app/server", "comm": "server", "signal": {"number": 11, "name": "SIGSEGV"}}


def frames(*names: object) -> list:
    return [{"pc": n if isinstance(n, int) else 0x401000 + i, "function": None if isinstance(n, int) else n,
             "sigtramp": n == "<tramp>"} for i, n in enumerate(names)]


def labels(*names: object) -> list:
    return signature.frame_labels(frames(*names), MODULES)


def test_top_frames_after_skipping_how_it_died() -> None:
    assert labels("__pthread_kill_implementation.constprop.0", "__pthread_kill_internal", "__GI_raise", "abort",
                  "__assert_fail_base", "__assert_fail", "parse", "handle", "serve", "main") == ["parse", "handle",
                                                                                                  "serve"]
    assert labels("main", "__libc_start_call_main", "__libc_start_main_impl", "_start") == ["main"]


def test_allocator_internals_fold_and_prefix_frames_do_not_count() -> None:
    assert labels("malloc_printerr", "_int_free_merge_chunk", "_int_free", "__GI___libc_free", "release", "handle",
                  "serve", "main") == ["free", "release", "handle", "serve"]
    assert labels("__memcpy_avx_unaligned_erms", "copy", "main") == ["memcpy", "copy", "main"]


def test_frames_of_a_signal_handler_are_skipped() -> None:
    assert labels("abort", "on_segv", "<tramp>", "parse", "main") == ["parse", "main"]


def test_names_lose_versions_arguments_and_whitespace() -> None:
    assert signature.normalise("memcpy@@GLIBC_2.14") == "memcpy"
    assert signature.normalise("ns::Parser::run(int, char const*) const") == "ns::Parser::run"
    spaced = "std::vector<int,  std::allocator<int> >::at"
    assert signature.normalise(spaced) == "std::vector<int, std::allocator<int> >::at"
    assert signature.normalise("x" * 500) == "x" * signature.MAX_LABEL


class _Measured:
    """A compiled expression that checks and notes the length of every text it is given: the work of these
    expressions grows with the text's length (with its square for some texts), so bounded lengths are bounded
    work. A longer text fails at once (uncut, the hostile names below cost minutes)."""

    def __init__(self, pattern: re.Pattern, lengths: list):
        self.pattern, self.lengths = pattern, lengths

    def __getattr__(self, name: str) -> object:
        method = getattr(self.pattern, name)

        def measured(*args: object, **kwargs: object) -> object:
            text = args[1] if name in ("sub", "subn") else args[0]
            assert len(text) <= signature.MAX_NAME, f"{self.pattern.pattern[:40]!r} read {len(text)} characters"
            self.lengths.append(len(text))
            return method(*args, **kwargs)
        return measured


def test_huge_names_are_cut_before_any_expression_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed program chooses its symbols: a 120 KB ``f(f(f(...`` or ``.part.part...`` name once cost the
    handler seconds of CPU per frame. Every expression now reads at most MAX_NAME characters of each frame, and
    a crash's frames are at most backtrace.MAX_FRAMES (here all of them are read: the first ones are skipped)."""
    lengths: list = []
    for attr, value in vars(signature).items():
        if isinstance(value, re.Pattern):
            monkeypatch.setattr(signature, attr, _Measured(value, lengths))
    monkeypatch.setattr(signature, "_FOLD", [(_Measured(p, lengths), public) for p, public in signature._FOLD])
    skipped = "__cxxabiv1::__terminate" + "f(" * 60000  # how it died: skipped, so the next frame is read too
    names = [skipped] * (backtrace.MAX_FRAMES - 3) + ["f(" * 60000, ".part" * 24000 + "x", "main"]
    sig = signature.from_frames(REC, frames(*names), MODULES)
    assert sig["frames"] == [("f(" * 60000)[:signature.MAX_LABEL], (".part" * 24000)[:signature.MAX_LABEL], "main"]
    assert len(sig["text"]) <= signature.MAX_TEXT
    assert sum(lengths) <= backtrace.MAX_FRAMES * 16 * signature.MAX_NAME  # per crash: every frame, every rule
    assert sum(lengths) >= (backtrace.MAX_FRAMES - 3) * signature.MAX_NAME  # the skipped frames were read


def test_frames_without_symbols_are_module_build_id_and_file_offset() -> None:
    # The faulting frame at its own pc; callers by their return address (looked up one byte back).
    got = labels(0x401234, 0x7F0000028010, 0x401000, 0x401500)
    assert got == [f"server@{'ab' * 8}+0x1234", "libc.so.6+0x28010", f"server@{'ab' * 8}+0x1000"]  # top 3
    assert labels(0x7FFC00000100, 0x401000) == ["?", f"server@{'ab' * 8}+0x1000"]  # outside any file


def test_signature_text_hash_and_version() -> None:
    sig = signature.from_frames(REC, frames("parse", "main"), MODULES)
    assert sig["text"] == "server SIGSEGV: parse | main" and sig["source"] == "backtrace"
    assert sig["version"] == signature.VERSION and len(sig["hash"]) == 16
    assert sig == signature.from_frames(dict(REC), frames("parse", "main"), MODULES)
    assert signature.from_frames(REC, frames("parse", "other"), MODULES)["hash"] != sig["hash"]
    assert signature.from_frames(REC, frames("abort", "raise"), MODULES) is None
    site = signature.from_site(REC, {"pc": 0x401234}, MODULES, "no gdb")
    assert site["text"] == f"server@{'ab' * 8} SIGSEGV: at server@{'ab' * 8}+0x1234"
    assert site["source"] == "crash site" and site["fallback_reason"] == "no gdb"
    assert signature.from_site(REC, None, MODULES, "x")["text"].endswith(": at ?")


def test_records_without_a_backtrace_join_the_one_signature_of_their_crash_site() -> None:
    full = signature.from_frames(REC, frames("parse", "main"), MODULES) | {"site": "s1"}
    site = signature.from_site(REC, {"pc": 0x401234}, MODULES, "rate limited") | {"site": "s1"}
    other = signature.from_frames(REC, frames("parse", "other"), MODULES) | {"site": "s2"}
    recs = [{"id": str(i), "time": f"t{i}", "signature": sig, "core": {"stored": i != 1},
             "container": {"runtime": "host"}} for i, sig in enumerate([full, site, other, site])]
    assert signature.keys(recs) == [full["hash"], full["hash"], other["hash"], full["hash"]]
    groups = signature.groups([("p", r) for r in recs])
    assert [(g["signature"], g["count"], g["cores"], g["sample"]) for g in groups] == [
        (full["text"], 3, 2, "0"), (other["text"], 1, 1, "2")]
    # Two backtrace signatures for one crash site: the crash-site records stay by themselves.
    recs[2]["signature"] = other | {"site": "s1"}
    assert signature.keys(recs)[1] == site["hash"]


def test_split_frames_takes_only_the_marked_line() -> None:
    marker = "corepipe-frames-0123: "
    forged = 'corepipe-frames-9999: [[1, "evil", false]]\n'
    text = f"Core was generated by `x'.\n{forged}{marker}[[4198400, \"main\", false], [5, null, true]]\n#0 main\n"
    rest, got = backtrace.split_frames(text, marker)
    assert got == [{"pc": 4198400, "function": "main", "sigtramp": False}, {"pc": 5, "function": None,
                                                                             "sigtramp": True}]
    assert marker not in rest and forged in rest
    assert backtrace.split_frames(f"{marker}[[1, 2]]\n", marker)[1] is None
    assert backtrace.split_frames("#0 main\n", marker) == ("#0 main\n", None)


@pytest.fixture(scope="module")
def gdb_core(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A core gdb writes of tests/bugs.c stopped at its crash, with gdb's own $pc for it."""
    gdb = need_tool("gdb")
    gcc = shutil.which("gcc")
    need(gcc is not None, "needs gcc")
    out = tmp_path_factory.mktemp("core")
    subprocess.run([gcc, "-g", "-O0", "-o", str(out / "bugs"), str(HERE / "bugs.c")], check=True)
    proc = subprocess.run([gdb, "-batch", "-nx", "-ex", "run", "-ex", "p/x $pc", "-ex",
                           f"generate-core-file {out}/core", "-ex", "kill", "--args", str(out / "bugs"), "other"],
                          capture_output=True, text=True, timeout=120)
    pc = int(next(line for line in proc.stdout.splitlines() if line.startswith("$1 = ")).split()[-1], 16)
    return (out / "core").read_bytes(), pc


def test_crash_site_is_the_faulting_pc_from_the_notes(gdb_core: tuple) -> None:
    core, pc = gdb_core
    site = elf.crash_site(memoryview(core))
    assert site is not None and site["pc"] == pc and site["si_code"] == 1  # SEGV_MAPERR: a NULL read
    assert site["si_addr"] == 0
    assert elf.crash_site(core[:200]) is None  # the notes are not in the head
    assert elf.crash_site(b"\x7fELF" + b"\0" * 100) is None
    assert elf.crash_site(Path(__file__).read_bytes()) is None


def test_a_storm_that_skipped_the_backtrace_keeps_the_crash_site_and_says_why() -> None:
    from corepipe.domain import postmortem
    from corepipe.domain.binaries import HeldFiles
    from corepipe.platform.config import Config

    site = signature.from_site(REC, {"pc": 0x401642}, MODULES, "no backtrace yet")
    rec = dict(REC, signature=dict(site, site=site["hash"]), core={"stored": True}, collector={"errors": []},
               postmortem={"skipped": "storm: 2 handlers busy (concurrent_postmortems)"})
    postmortem.sign(rec, HeldFiles(), Config())
    assert rec["signature"]["hash"] == site["hash"] and rec["signature"]["site"] == site["hash"]
    assert rec["signature"]["fallback_reason"] == "no backtrace: storm: 2 handlers busy (concurrent_postmortems)"
    assert rec["collector"]["errors"] == []
