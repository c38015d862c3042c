"""Does the crashed process provably belong to the container its cgroup names?

A cgroup name alone is forgeable (a user's delegated subtree, a container's own sub-cgroups), and
so are the bind mounts over /etc/hostname and conmon's command line. What is not: the namespaces
the kernel put the process in. A container counts only when its runtime's state names its init
process (Docker's ``State.Pid``, runc's ``init_process_pid``, conmon's pidfile, nspawn's leader),
that process sits in the container's cgroup, and the crashed process shares its PID namespace (and,
when it is the same one, its mount namespace) or lives in a PID namespace below it (a nested
container). A container's monitor (conmon) must be the very process the runtime recorded.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from typing import Optional

from corepipe.domain.containers import cgroup, state
from corepipe.domain.containers.model import Container
from corepipe.platform import procfs

#: ioctl(2) on a namespace fd: the parent PID namespace (linux/nsfs.h, _IO(0xb7, 0x2)).
NS_GET_PARENT = 0xB702
MAX_DEPTH = 32


@dataclass
class Process:
    """The crashed process as the kernel placed it: host PID, and its namespaces as ``ns`` links read."""
    pid: int
    #: Its PID namespace first, then each parent up to the handler's ("pid:[4026531836]").
    pid_ns: list = field(default_factory=list)
    mnt_ns: Optional[str] = None


def pid_namespaces(fd: Optional[int]) -> list:
    """The PID namespace of an ``ns/pid`` fd and its ancestors (NS_GET_PARENT stops at the caller's own)."""
    if fd is None:
        return []
    chain, current = [], os.dup(fd)
    try:
        for _ in range(MAX_DEPTH):
            chain.append(f"pid:[{os.fstat(current).st_ino}]")
            try:
                parent = fcntl.ioctl(current, NS_GET_PARENT)
            except OSError:
                break
            os.close(current)
            current = parent
    finally:
        os.close(current)
    return chain


def check(container: Container, process: Optional[Process], deadline: state.Deadline, root: str) -> Optional[str]:
    """None when ``process`` belongs to ``container`` (whose runtime's state was read), else why not."""
    if "+state" not in container.source:
        return "the runtime's state on disk does not confirm this container"
    if process is None or not process.pid_ns:
        return "the crashed process's namespaces are not known (no live process)"
    monitor = container.details.get("monitor")
    if monitor:
        # The crashed process itself, whose cgroup (captured while the kernel held it) is the monitor's scope.
        recorded = container.details.get("monitor_pid")
        return None if process.pid == recorded else f"not the container's {monitor} (pid {recorded})"
    init = container.details.get("init_pid")
    if not isinstance(init, int) or init <= 0:
        return "the runtime's state records no init process"
    proc = state.path(root, "proc", str(init))
    paths = cgroup.candidate_paths(state.read(state.path(proc, "cgroup"), deadline, 1 << 16).decode(errors="replace"))
    scope = container.scope
    if not any(p == scope or p.startswith(scope + "/") for p in paths):
        return f"the recorded init (pid {init}) is not in the container's cgroup"
    init_ns = procfs.namespace(init, "pid", state.path(root, "proc"))
    if process.pid_ns[0] == init_ns:
        if process.mnt_ns and procfs.namespace(init, "mnt", state.path(root, "proc")) != process.mnt_ns:
            return f"in the PID namespace of the container's init (pid {init}) but not in its mount namespace"
        return None
    if init_ns in process.pid_ns[1:]:
        container.details["nested_pid_ns"] = True
        return None
    return f"not in the PID namespace of the container's init (pid {init}) nor below it"
