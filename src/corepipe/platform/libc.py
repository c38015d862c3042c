"""Every libc call corepipe makes through ctypes (setns, unshare, mount, prctl, capset, inotify), with the flags
they take: one handle, and each failure an OSError with its errno and what was asked.

``load`` opens the handle once; a process whose forked child must import and load nothing (the debugger's
preexec, serve's workers) calls it before the fork.
"""

from __future__ import annotations

import ctypes
import functools
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
#: linux/capability.h: _LINUX_CAPABILITY_VERSION_3 (two 32-bit words per set).
_CAPABILITY_V3 = 0x20080522


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The C library this process already has loaded."""
    return ctypes.CDLL(None, use_errno=True)


def _checked(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def setns(fd: int, nstype: int) -> None:
    """Join the namespace ``fd`` refers to (a CLONE_NEW* ``nstype``); this thread only."""
    _checked(load().setns(fd, nstype), "setns")


def unshare(flags: int, what: str = "unshare") -> None:
    _checked(load().unshare(flags), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _checked(load().mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags, None),
             f"mount {source} on {target}")


def prctl(option: int, arg: int, what: str) -> None:
    _checked(load().prctl(option, arg, 0, 0, 0), what)


def clear_capabilities() -> None:
    """Empty this thread's effective, permitted and inheritable capability sets (capset)."""
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_V3, 0)
    _checked(load().capset(header, (ctypes.c_uint32 * 6)()), "capset")


def inotify_init1(flags: int) -> int:
    return _checked(load().inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _checked(load().inotify_add_watch(fd, os.fsencode(path), mask), f"inotify_add_watch {path}")
