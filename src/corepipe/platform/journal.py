"""A crash's entry in ``corepipe serve``'s journal (services/forwarded.py writes and reads it), on the collecting
worker's side: once the crash has its first ("collecting") record the entry names it, and the entry goes only
with the final record, so a server whose worker died or was killed finishes that record instead of leaving it
at "collecting" (or filing a second one).
"""

from __future__ import annotations

import os
from typing import Optional

from corepipe.platform.fs import unlink_if_present
from corepipe.platform.log import ERR, log

#: Beside ``<journal>/<pid>``: the collecting worker's pid and the crash directory of its first record.
SUFFIX = ".record"


def recorded(entry: str, crash_path: str, final: bool) -> Optional[str]:
    """The crash's record was written to ``crash_path``: name it beside ``entry`` (with this worker's pid), or,
    when the record is ``final``, remove the entry; what the caller keeps as its entry (None once final)."""
    if final:
        done(entry)
        return None
    try:
        write(entry + SUFFIX, f"{os.getpid()}\n{crash_path}")
    except OSError as exc:
        log(f"error: cannot name the record {crash_path} in the journal entry {entry} (should this worker be "
            f"killed, a second record is filed instead): {exc}", ERR)
    return entry


def write(path: str, text: str) -> None:
    """A journal file (root's only, never through a link), whole."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)


def done(entry: Optional[str]) -> None:
    """The crash has its final record (or a count instead): its entry goes."""
    if entry is not None:
        unlink_if_present(entry + SUFFIX)
        unlink_if_present(entry)


def record_of(entry: str) -> Optional[tuple]:
    """(the worker's pid, the crash directory) named beside ``entry``, or None: no record yet."""
    try:
        fd = os.open(entry + SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 8192).decode("utf-8", "surrogateescape")
    finally:
        os.close(fd)
    pid, _, path = data.partition("\n")
    return (int(pid), path) if pid.isdigit() and path.startswith("/") else None
