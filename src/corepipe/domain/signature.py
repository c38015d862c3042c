"""A signature per crash: which crashes are the same bug, computed on the node without any network.

In the spirit of Mozilla Socorro's siggen: the crashing thread's frames, newest first, as
function names where the binaries have symbols and ``module@build-id+offset`` where they do not
(the offset is into the file, so it does not move with ASLR); frames of a signal handler (newer
than the signal trampoline), of abort/assert/raise/pthread_kill and of the C runtime's start are
skipped, allocator internals fold into the public function (``_int_free`` -> ``free``), and
prefix frames (allocator and mem*/str* functions) are kept without counting; the first
``TOP_FRAMES`` frames that count end it. The executable's file name and the signal complete it:
``crasher SIGSEGV: write_site | caller_a | main``.

When there are no frames (no debugger, the core not stored, a timeout), the crash site stands in:
the executable's build-id, the signal and the faulting instruction's ``module@build-id+offset`` from
the core's NT_PRSTATUS note and the /proc maps captured at the crash (``source: "crash site"``,
``fallback_reason`` says why). The crash site is also known before the core is read, so the
storage policy can keep only the first cores of a site (``site`` in the record; see accounting).
Changing any rule changes signatures: bump ``VERSION``.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional

from corepipe.platform import procfs

VERSION = 1
ALGORITHM = "corepipe-siggen"
#: Frames that count (not prefix frames) in a signature.
TOP_FRAMES = 3
MAX_LABEL = 160
MAX_TEXT = 1024
#: Characters of a function name that any rule reads. The crashed program chooses its symbols: a 120 KB
#: ``f(f(f(...`` name cost seconds in the argument and clone-suffix expressions (their work grows with the
#: square of the length); cut first, a frame costs under a millisecond (backtrace.MAX_FRAMES frames a crash).
MAX_NAME = 1024

#: Frames that say how the process died, not where: skipped (Socorro's "irrelevant" frames).
_SKIP = re.compile("|".join([
    r"(__GI_)?raise", r"gsignal", r"(__GI_)?abort", r"(__GI_)?_*pthread_kill(_implementation|_internal)?",
    r"__restore_rt", r"(__GI_)?__assert_(perror_)?fail(_base)?", r"__libc_message(_impl)?", r"__libc_fatal",
    r"__fortify_fail(_abort)?", r"__chk_fail", r"__stack_chk_fail(_local)?", r"malloc_printerr", r"__malloc_assert",
    r"__libc_start_call_main", r"__libc_start_main(_impl|_alias_\d+)?", r"_start",
    r"std::terminate", r"__cxxabiv1::__terminate.*", r"__gnu_cxx::__verbose_terminate_handler", r"__cxa_(re)?throw",
    r"_Unwind_\w+",
]))
#: Allocator internals, folded into the public function they serve.
_FOLD = [
    (re.compile(r"_int_malloc|sysmalloc|malloc_consolidate|tcache_init|_int_memalign|(__GI_)?__libc_malloc"
                r"|malloc_hook_ini"), "malloc"),
    (re.compile(r"_int_free(_\w+)?|(__GI_)?__libc_free|unlink_chunk(\.\w+)?"), "free"),
    (re.compile(r"_int_realloc|(__GI_)?__libc_realloc|realloc_hook_ini"), "realloc"),
    (re.compile(r"(__GI_)?__libc_calloc"), "calloc"),
]
_STRING_FUNCTION = re.compile(r"__(mem(?:cpy|move|set|cmp|chr)|str(?:n?len|n?cpy|n?cmp|r?chr))(_\w+)?")
#: Kept in the signature but not counted: the frame that called them says more (Socorro's prefix frames).
_PREFIX = re.compile(r"malloc|free|realloc|calloc|operator new.*|operator delete.*"
                     r"|mem(cpy|move|set|cmp|chr)|str(n?len|n?cpy|n?cmp|r?chr)")
_SYMBOL_VERSION = re.compile(r"@@?[A-Za-z0-9_.]+$|@plt$")
_CLONE_SUFFIX = re.compile(r"(\.(constprop|isra|part|cold|lto_priv|localalias)(\.\d+)?)+$")
_ARGUMENTS = re.compile(r"(?<=[\w>])\(.*\)( const)?$")


class Modules:
    """Where a process's addresses are: its mappings at crash time (/proc maps) and build-ids by path."""

    def __init__(self, maps: Optional[str], build_ids: dict, exe: Optional[str]):
        self.segments = _segments(maps or "")
        self.build_ids = build_ids
        self.exe = exe

    def locate(self, address: int) -> Optional[tuple]:
        """(path, offset into the file) of an address in a file-backed mapping, else None."""
        for start, end, offset, path in self.segments:
            if start <= address < end:
                return path, address - start + offset
        return None

    def label(self, address: int, *, caller: bool = False) -> str:
        """``module@build-id+0xoffset`` (the build-id's first 16 digits) or ``?`` outside any file."""
        # A return address may be one past the call's mapping: look it up one byte back.
        found = self.locate(address - 1 if caller else address)
        if found is None:
            return "?"
        path, offset = found
        offset += 1 if caller else 0
        build_id = self.build_ids.get(path)
        module = _module_name(path)
        return f"{module}@{build_id[:16]}+{offset:#x}" if build_id else f"{module}+{offset:#x}"


def _segments(maps: str) -> list:
    return [(m.start, m.end, m.offset, m.path) for m in procfs.mappings(maps)]


def _module_name(path: str) -> str:
    name = os.path.basename(path.removesuffix(" (deleted)"))
    return name[:64] or "?"


def normalise(name: str) -> str:
    """A function name without symbol version, clone suffix, argument list or runs of spaces, at most
    MAX_LABEL characters; only its first MAX_NAME characters are read."""
    name = " ".join(name[:MAX_NAME].split())
    name = _CLONE_SUFFIX.sub("", _SYMBOL_VERSION.sub("", name))  # gcc's clones are the same function
    name = _ARGUMENTS.sub("", name) if not name.startswith("(") else name
    return name[:MAX_LABEL]


def _canonical(label: str) -> str:
    for pattern, public in _FOLD:
        if pattern.fullmatch(label):
            return public
    match = _STRING_FUNCTION.fullmatch(label)
    return match.group(1) if match else label


def frame_labels(frames: list, modules: Modules) -> list:
    """The frames that make the signature, after the skip, fold and prefix rules, ending with the
    TOP_FRAMES-th frame that counts."""
    newest_tramp = max((i for i, f in enumerate(frames) if f.get("sigtramp")), default=None)
    if newest_tramp is not None:
        frames = frames[newest_tramp + 1:]  # the handler's own frames say nothing about the crash
    labels: list = []
    counted = 0
    for index, frame in enumerate(frames):
        name = frame.get("function")
        if name:
            label = normalise(name)
            if _SKIP.fullmatch(label):
                continue
            label = _canonical(label)
        else:
            label = modules.label(frame["pc"], caller=index > 0)  # older frames' pcs are return addresses
        if labels and labels[-1] == label and _PREFIX.fullmatch(label):
            continue  # folded internals of one allocator call
        labels.append(label)
        if not _PREFIX.fullmatch(label):
            counted += 1
            if counted == TOP_FRAMES:
                break
    return labels


def _identity(rec: dict) -> str:
    signal = rec.get("signal") or {}
    exe = rec.get("exe")
    name = _module_name(exe) if isinstance(exe, str) and exe else str(rec.get("comm") or "?")[:64]
    return f"{name} {signal.get('name') or signal.get('number') or '?'}"


def _result(text: str, source: str, labels: list, reason: Optional[str]) -> dict:
    text = text[:MAX_TEXT]
    digest = hashlib.sha256(f"{ALGORITHM} {VERSION}\n{text}".encode("utf-8", "surrogateescape")).hexdigest()
    return {"text": text, "hash": digest[:16], "algorithm": ALGORITHM, "version": VERSION, "source": source,
            "frames": labels, "fallback_reason": reason}


def from_frames(rec: dict, frames: list, modules: Modules) -> Optional[dict]:
    """The signature from the crashing thread's frames (backtrace.split_frames), or None if no frame is left."""
    labels = frame_labels(frames, modules)
    if not labels or labels == ["?"]:
        return None
    return _result(f"{_identity(rec)}: {' | '.join(labels)}", "backtrace", labels, None)


def from_site(rec: dict, site: Optional[dict], modules: Modules, reason: str) -> dict:
    """The fallback: executable (with build-id), signal and the faulting instruction's place
    (elf.crash_site); ``reason`` says why there are no frames."""
    exe_id = modules.build_ids.get(modules.exe) if modules.exe else None
    where = modules.label(site["pc"]) if site and site.get("pc") is not None else "?"
    identity = _identity(rec)
    if exe_id:
        name, _, signal = identity.partition(" ")
        identity = f"{name}@{exe_id[:16]} {signal}"
    return _result(f"{identity}: at {where}", "crash site", [where], reason)



def key(rec: dict) -> str:
    """The hash a record is grouped by; ``-`` for records from before signatures (or without one)."""
    sig = rec.get("signature")
    return str(sig.get("hash")) if isinstance(sig, dict) and sig.get("hash") else "-"


def keys(records: list) -> list:
    """The grouping key of each record: its own hash, except that a crash without a backtrace (its core was
    rate limited, say) joins the backtrace signature of the crashes with the same crash site, when there is
    exactly one such signature."""
    by_site: dict = {}
    for rec in records:
        sig = rec.get("signature") if isinstance(rec.get("signature"), dict) else {}
        if sig.get("source") == "backtrace" and sig.get("site"):
            by_site.setdefault(sig["site"], set()).add(key(rec))
    result = []
    for rec in records:
        sig = rec.get("signature") if isinstance(rec.get("signature"), dict) else {}
        known = by_site.get(sig.get("site")) if sig.get("source") == "crash site" else None
        result.append(next(iter(known)) if known and len(known) == 1 else key(rec))
    return result


def groups(items: list) -> list:
    """One dict per signature of (path, record) ``items`` (oldest first), the most crashes first:
    ``{signature, hash, source, count, cores, first_seen, first_timestamp, last_seen, containers, images, nodes,
    sample}`` (``nodes``: those a fleet's crashes came from, empty for a local store); grouped by ``keys``."""
    records = [rec for _path, rec in items]
    found: dict = {}
    named: set = set()
    for rec, group_key in zip(records, keys(records)):
        sig = rec.get("signature") if isinstance(rec.get("signature"), dict) else {}
        entry = found.setdefault(group_key, {
            "signature": "-", "hash": group_key, "source": None, "count": 0, "cores": 0,
            "first_seen": rec.get("time"), "first_timestamp": rec.get("timestamp"), "last_seen": None,
            "containers": [], "images": [], "nodes": [], "sample": rec.get("id")})
        if key(rec) == group_key and group_key not in named:  # the first crash with the group's own signature
            named.add(group_key)
            entry.update(signature=sig.get("text") or "-", source=sig.get("source"), sample=rec.get("id"))
        entry["count"] += 1
        entry["cores"] += bool((rec.get("core") or {}).get("stored"))
        entry["last_seen"] = rec.get("time")
        container = rec.get("container") or {}
        name = "host" if container.get("runtime") == "host" else (container.get("name") or container.get("id")
                                                                   or container.get("runtime"))
        for field, value in (("containers", name), ("images", container.get("image")), ("nodes", rec.get("node"))):
            if value and value not in entry[field]:
                entry[field].append(value)
    return sorted(found.values(), key=lambda g: (-g["count"], str(g["last_seen"]), g["hash"]))
