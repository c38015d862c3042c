"""The kernel settings corepipe owns, read and written under a /proc/sys root that tests can replace.

Values are exchanged as text without the trailing newline the kernel adds on read; a write
is read back, because the kernel silently truncates core_pattern (127 bytes) instead of failing.
"""

from __future__ import annotations

import errno
import os

from corepipe.platform.errors import UserError

PROC_SYS = "/proc/sys"
CORE_PATTERN = "kernel.core_pattern"
CORE_PIPE_LIMIT = "kernel.core_pipe_limit"


class SysctlError(UserError):
    """A setting cannot be read or written; the message says what to do."""


class Sysctl:
    def __init__(self, root: str = PROC_SYS):
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("."))

    def read(self, name: str) -> str:
        try:
            with open(self.path(name), "rb") as f:
                data = f.read(4096)
        except OSError as exc:
            raise SysctlError(f"cannot read {self.path(name)}: {exc.strerror}") from None
        if data.endswith(b"\n"):
            data = data[:-1]
        return data.decode("utf-8", "surrogateescape")

    def check_writable(self, *names: str) -> None:
        """Fail before anything is changed if a setting cannot be written (not root, read-only /proc/sys)."""
        for name in names:
            try:
                os.close(os.open(self.path(name), os.O_WRONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    raise SysctlError(f"{self.path(name)} is read-only (inside a container?); run this on the "
                                      "host, or in a privileged container with the host's /proc") from None
                if exc.errno in (errno.EACCES, errno.EPERM):
                    raise SysctlError(f"cannot write {self.path(name)}: permission denied; run as root") from None
                raise SysctlError(f"cannot write {self.path(name)}: {exc.strerror}") from None

    def write(self, name: str, value: str) -> None:
        """Set ``name`` to ``value`` and check the kernel kept exactly that."""
        data = value.encode("utf-8", "surrogateescape") + b"\n"
        try:
            fd = os.open(self.path(name), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SysctlError(f"the kernel refused {name} = {value!r}: {exc.strerror}") from None
        kept = self.read(name)
        if kept != value:
            raise SysctlError(f"the kernel kept {name} = {kept!r} instead of {value!r} (truncated or rejected)")
