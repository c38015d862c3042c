"""Which user a uid belongs to: the owner of a process's user namespace, or of a subordinate-id range.

A user with subordinate uids (``/etc/subuid``: the adduser default, and what rootless Podman needs) can
run processes as 65536 uids of their own. Counted per uid, each would be a fresh policy group with limits
of its own; counted under the user they belong to, they share that user's. Two sources, both out of the
crashing process's reach: the kernel (the uid that made the outermost user namespace the process is in,
below the reader's own: ioctl NS_GET_PARENT and NS_GET_OWNER_UID on ``/proc/<pid>/ns/user``), and root's
``/etc/subuid`` for a subordinate uid seen outside any user namespace.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import sys
from typing import Optional

#: linux/nsfs.h: _IO(0xb7, 2) and _IO(0xb7, 4).
NS_GET_PARENT = 0xB702
NS_GET_OWNER_UID = 0xB704
#: The kernel nests user namespaces 32 deep at most.
MAX_DEPTH = 33
SUBUID = "/etc/subuid"
_SUBUID_MAX = 1 << 20


def _same(fd: int, own: os.stat_result) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def namespace_owner(ns_fd: int) -> Optional[int]:
    """The uid (in this process's user namespace) that made the outermost user namespace ``ns_fd`` is nested in;
    None when ``ns_fd`` is this process's own user namespace or the kernel will not say."""
    own = os.stat("/proc/self/ns/user")
    fd = os.dup(ns_fd)
    try:
        for _ in range(MAX_DEPTH):
            if _same(fd, own):
                return None
            parent = fcntl.ioctl(fd, NS_GET_PARENT)
            top = _same(parent, own)
            if not top:
                os.close(fd)
                fd = parent
                continue
            os.close(parent)
            uid = bytearray(4)
            fcntl.ioctl(fd, NS_GET_OWNER_UID, uid)
            return int.from_bytes(uid, sys.byteorder)
        return None
    except OSError:  # EPERM: a parent outside this process's namespace
        return None
    finally:
        os.close(fd)


def subuid_owner(uid: int, path: str = SUBUID) -> Optional[int]:
    """The uid of the user whose subordinate range (``name:start:count`` lines of ``path``) holds ``uid``."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SUBUID_MAX)
    except OSError:
        return None
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            continue
        start, count = int(fields[1]), int(fields[2])
        if start <= uid < start + count:
            if fields[0].isdigit():
                return int(fields[0])
            try:
                return pwd.getpwnam(fields[0]).pw_uid
            except KeyError:
                return None
    return None
