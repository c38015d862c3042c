"""Cloud Foundry Garden (Guardian): ``/garden/<handle>`` and ``garden.service/garden/<handle>``.

Guardian runs each container with runc, named by its handle: in runc mode runc's own state
(``/run/runc/<handle>/state.json``), in containerd mode containerd's ``garden`` namespace
(``/run/containerd/runc/garden/<handle>/state.json``). Both record the init PID.
"""

from __future__ import annotations

from typing import Optional

from corepipe.domain.containers import containerd, runc, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import NAME as VALID_NAME

NAME = "garden"
ENRICHES = (NAME,)
NAMESPACE = "garden"


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments[:-1]):
        handle = segments[i + 1]
        if seg == "garden" and VALID_NAME.fullmatch(handle):
            return i + 1, Container(runtime=NAME, id=handle, name=handle)
    return None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    handle = container.id or ""
    if not VALID_NAME.fullmatch(handle):
        return
    for state_root in (state.path(root, containerd.RUNC_ROOT, NAMESPACE), state.path(root, runc.STATE_ROOT)):
        if state.exists(runc.state_file(state_root, handle)):
            runc.read_state(state_root, handle, container, deadline)
            container.state_confirmed()
            return
    raise FileNotFoundError(f"no runc state for garden container {handle}")
