"""The kernel's side of the contract: the core_pattern line and the arguments it expands to.

The kernel splits the pattern on spaces *before* it expands the specifiers, so a
comm (%e) or hostname (%h) with spaces still arrives as one argument. A specifier
the kernel does not know expands to an empty string, which keeps the positions fixed.

This module is the one statement of that contract: the pattern written (``build_pattern``), the
pattern recognised as corepipe's (``is_corepipe_pattern``) and the arguments parsed (``parse_args``).
capture.py, which must run before this module is imported, keeps only the positions of the pid and
pidfd; they are checked against FIELDS here, at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from corepipe.platform import capture

#: The order of the specifiers after ``corepipe collect [--config PATH]``; documented in the README.
SPECIFIERS = ("%P", "%p", "%I", "%u", "%g", "%s", "%t", "%c", "%d", "%F", "%h", "%e")
FIELDS = ("pid", "ns_pid", "tid", "uid", "gid", "signal", "time", "core_limit", "dump_mode",
          "pidfd", "hostname", "comm")
#: The option before the specifiers, as capture.kernel_ids reads it too.
CONFIG_OPTION = "--config"
if (capture.ARG_COUNT, capture.PID_AT, capture.PIDFD_AT, capture.CONFIG_OPTION) != (
        len(FIELDS), FIELDS.index("pid"), FIELDS.index("pidfd"), CONFIG_OPTION):
    raise ImportError("capture.py's kernel argument positions disagree with kernel.FIELDS")
_OURS = re.compile(rf"\|\S+ collect( {CONFIG_OPTION} \S+)? {re.escape(SPECIFIERS[0])} ")
#: What ``%c`` expands to for ``ulimit -c unlimited`` (RLIM_INFINITY as an unsigned long).
RLIM_INFINITY = 2**64 - 1
#: The kernel silently truncates core_pattern to this many bytes (CORENAME_MAX_SIZE - 1).
PATTERN_MAX = 127


class PatternTooLong(ValueError):
    """The pattern would be cut by the kernel, losing arguments."""


@dataclass
class KernelArgs:
    """What the kernel told us about the crash; a field is None where it was missing or malformed."""

    pid: Optional[int] = None
    ns_pid: Optional[int] = None
    tid: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    signal: Optional[int] = None
    time: Optional[int] = None
    core_limit: Optional[int] = None
    dump_mode: Optional[int] = None
    pidfd: Optional[int] = None
    hostname: Optional[str] = None
    comm: Optional[str] = None
    config: Optional[str] = None
    errors: list[str] = field(default_factory=list)

    def core_limit_bytes(self) -> Optional[int]:
        """The RLIMIT_CORE to honour: None for unlimited (or unknown), else a byte count."""
        if self.core_limit is None or self.core_limit >= RLIM_INFINITY:
            return None
        return self.core_limit


def build_pattern(executable: str, config: Optional[str] = None, pidfd: bool = True) -> str:
    """The ``|...`` line for kernel.core_pattern; raises PatternTooLong rather than be truncated."""
    words = ["|" + executable, "collect"]
    if config:
        words += [CONFIG_OPTION, config]
    words += [s if (s != "%F" or pidfd) else "-" for s in SPECIFIERS]
    pattern = " ".join(words)
    if any(c.isspace() for c in executable + (config or "")):
        raise ValueError("the handler and config paths must not contain white space")
    if len(pattern.encode()) > PATTERN_MAX:
        raise PatternTooLong(f"core_pattern would be {len(pattern.encode())} bytes; the kernel keeps {PATTERN_MAX}")
    return pattern


def is_corepipe_pattern(pattern: str) -> bool:
    """A core_pattern that ``build_pattern`` made (for any handler path and config)."""
    return bool(_OURS.match(pattern))


def _number(text: str) -> int:
    if not capture.is_number(text):
        raise ValueError(text)
    return int(text)


#: An argument the writer did not know (the kernel's own "-" for %F where it lacks pidfds).
UNKNOWN = "-"


def parse_args(argv: list[str]) -> KernelArgs:
    """Parse ``[--config PATH] <specifiers>``; never raises, collects what is wrong in ``errors``."""
    args = KernelArgs()
    rest = list(argv)
    if len(rest) >= 2 and rest[0] == CONFIG_OPTION:
        args.config = rest[1]
        rest = rest[2:]
    if len(rest) != len(FIELDS):
        args.errors.append(f"expected {len(FIELDS)} kernel arguments ({' '.join(SPECIFIERS)}), got {len(rest)}")
        # Trust nothing positional when the count is off, except a leading host PID.
        rest = rest[:1] if rest and capture.is_number(rest[0]) else []
    for name, value in zip(FIELDS, rest):
        if name in ("hostname", "comm"):
            setattr(args, name, value)
        elif value == UNKNOWN:  # not known to whoever wrote the arguments (a server's journal): left None
            continue
        elif name == "pidfd":
            if value != "":
                try:
                    args.pidfd = _number(value)
                except ValueError:
                    args.errors.append(f"bad pidfd argument {value[:40]!r}")
        else:
            try:
                setattr(args, name, _number(value))
            except ValueError:
                args.errors.append(f"bad {name} argument {value[:40]!r}")
    return args
