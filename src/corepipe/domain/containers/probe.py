"""A 64-hex id in an unfamiliar cgroup path (``docker run --cgroup-parent``, nerdctl, Nomad): ask each
runtime's state whose it is; when none has it, an ``unknown`` runtime with that id (never the host)."""

from __future__ import annotations

from typing import Optional

from corepipe.domain.containers import containerd, crio, docker, podman, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID

ENRICHES = ()


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        cid = seg[:-6].rsplit("-", 1)[-1] if seg.endswith(".scope") else seg
        if not HEX_ID.fullmatch(cid):
            continue
        return i, Container(runtime=_owner(cid, root) or "unknown", id=cid)
    return None


def _owner(cid: str, root: str) -> Optional[str]:
    try:
        return _lookup(cid, root)
    except (OSError, ValueError, AttributeError, TimeoutError):
        return None


def _lookup(cid: str, root: str) -> Optional[str]:
    if docker.has_state(cid, root):
        return docker.NAME
    if containerd.namespace_of(cid, root):
        return containerd.NAME
    deadline = state.Deadline(0.2)
    if podman.bundle_config(cid, deadline, root) is not None:
        return crio.NAME if crio.has_state(cid, deadline, root) else podman.NAME
    return None
