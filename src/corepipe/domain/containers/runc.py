"""runc used directly, and the runc state every runc-based runtime keeps.

Direct runc: the cgroup is ``/<id>`` (cgroupfs; v1 controllers may nest it below the caller's
group) or ``runc-<id>.scope`` (``--systemd-cgroup``), and ``/run/runc/<id>/state.json`` exists.
The state's ``bundle=`` label leads to the OCI ``config.json`` and its annotations.
"""

from __future__ import annotations

from typing import Optional

from corepipe.domain import batch
from corepipe.domain.containers import cgroup, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import NAME as VALID_NAME

NAME = "runc"
ENRICHES = (NAME,)
STATE_ROOT = "run/runc"


def state_file(state_root: str, cid: str) -> str:
    return state.path(state_root, cid, "state.json")


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        cid = cgroup.scope_id(seg, "runc-") if seg.endswith(".scope") else seg
        if VALID_NAME.fullmatch(cid) and state.exists(state_file(state.path(root, STATE_ROOT), cid)):
            return i, Container(runtime=NAME, id=cid, name=cid)
    return None


def read_state(state_root: str, cid: str, container: Container, deadline: state.Deadline) -> dict:
    """Load runc's state.json; note the bundle and whether its cgroup is the process's."""
    doc = state.read_json(state_file(state_root, cid), deadline)
    config = doc.get("config") or {}
    for label in config.get("labels") or []:
        if isinstance(label, str) and label.startswith("bundle="):
            container.details["bundle"] = label[len("bundle="):]
    init = state.positive_int(doc.get("init_process_pid"))
    if init:
        container.details["init_pid"] = init
    paths = [p for p in (doc.get("cgroup_paths") or {}).values() if isinstance(p, str)]
    if container.cgroup and paths:
        container.details["state_cgroup_matches"] = any(p.endswith(container.cgroup) for p in paths)
    return doc


def bundle_annotations(container: Container, deadline: state.Deadline, root: str) -> dict:
    """The annotations of the OCI config.json in the bundle runc's state names (absolute path only); the Azure
    Batch variables of its ``process.env`` go to ``container.batch`` on the way, the file being read anyway."""
    bundle = container.details.get("bundle")
    if not bundle or not bundle.startswith("/") or "/../" in bundle + "/":
        return {}
    config = state.read_json(state.path(root, bundle.lstrip("/"), "config.json"), deadline)
    process = config.get("process")
    container.batch = batch.from_env(process.get("env") if isinstance(process, dict) else None) or {}
    annotations = config.get("annotations") or {}
    return {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.id or not VALID_NAME.fullmatch(container.id):
        return
    read_state(state.path(root, STATE_ROOT), container.id, container, deadline)
    annotations = bundle_annotations(container, deadline, root)
    container.image = annotations.get("org.opencontainers.image.ref.name") or container.image
    if annotations:
        container.details["annotations"] = annotations
    if container.details.get("state_cgroup_matches") is not False:
        container.state_confirmed()
