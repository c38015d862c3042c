"""LXC, LXD and Incus: ``lxc.payload.<name>`` (LXC 4+, LXD, Incus), ``lxc.payload/<name>`` and ``lxc/<name>`` (older).

``lxc.monitor.<name>`` holds LXC's monitor, a host process. The cgroup does not say which
manager made the container; its state directory does.
"""

from __future__ import annotations

from typing import Optional

from corepipe.domain.containers import state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import NAME

RUNTIME = "lxc"
ENRICHES = (RUNTIME,)
#: Manager -> where it keeps a container's directory (first match wins).
MANAGERS = (
    ("incus", "var/lib/incus/containers"),
    ("lxd", "var/snap/lxd/common/lxd/containers"),
    ("lxd", "var/lib/lxd/containers"),
    ("lxc", "var/lib/lxc"),
)


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        name = None
        if seg.startswith("lxc.payload."):
            name = seg[len("lxc.payload."):]
        elif seg in ("lxc.payload", "lxc") and i + 1 < len(segments):
            name, i = segments[i + 1], i + 1
        if name is not None:
            return (i, Container(runtime=RUNTIME, id=name, name=name)) if NAME.fullmatch(name) else None
    return None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.name or not NAME.fullmatch(container.name):
        return
    for manager, base in MANAGERS:
        directory = state.path(root, base, container.name)
        if state.exists(directory):
            container.details.update(manager=manager, directory="/" + state.path(base, container.name))
            container.state_confirmed()
            return
