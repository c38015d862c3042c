"""Logging for a process that has no stdout: the kernel log and syslog.

Each crash gets one line; failures get a line with their cause. Nothing here may raise.
"""

from __future__ import annotations

import os

ERR, WARNING, INFO = 3, 4, 6
_FACILITY_DAEMON = 3 << 3
_MAX = 900  # a /dev/kmsg record holds about 1 KiB


def clean(text: str, limit: int = _MAX, keep: str = "") -> str:
    """One printable line: control characters (newlines included, unless in ``keep``), escape sequences'
    ESC and undecodable bytes (lone surrogates) become '?'."""
    text = text[:limit]
    if text.isascii():  # the common case, in one pass of C (a command's output may be megabytes)
        return text.translate(_ascii_table(keep))
    return "".join(c if c.isprintable() or c in keep else "?" for c in text)


_TABLES: dict = {}


def _ascii_table(keep: str) -> dict:
    """str.translate's table turning ASCII control characters not in ``keep`` into '?'."""
    if keep not in _TABLES:
        _TABLES[keep] = {c: "?" for c in (*range(0x20), 0x7F) if chr(c) not in keep}
    return _TABLES[keep]


class CleanOutput:
    """A text stream that passes every write through ``clean`` (keeping newlines and tabs): whatever a
    command prints (names chosen by a crashed process included) cannot drive the terminal or fail to encode."""

    def __init__(self, stream: object):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(clean(text, len(text), keep="\n\t"))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def log(message: str, level: int = INFO) -> None:
    line = clean(message)
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.write(fd, f"<{_FACILITY_DAEMON | level}>corepipe[{os.getpid()}]: {line}\n".encode(errors="replace"))
        finally:
            os.close(fd)
    except OSError:
        pass
    if os.path.exists("/dev/log"):
        try:
            import syslog

            syslog.openlog("corepipe", syslog.LOG_PID, syslog.LOG_DAEMON)
            syslog.syslog(level, line)
        except OSError:
            pass
