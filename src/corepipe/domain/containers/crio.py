"""CRI-O: ``crio-<id>.scope`` (systemd driver) or ``crio-<id>`` (cgroupfs), usually below a kubepods pod.

CRI-O keeps each container's OCI config.json in containers/storage (``userdata/config.json``
under the run root, or the graph root), with the pod and image in its annotations.
``crio-conmon-<id>`` holds CRI-O's monitor (conmon) of container <id>: filed with it, ``details.monitor``.
"""

from __future__ import annotations

from typing import Optional

from corepipe.domain.containers import cgroup, podman, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID

NAME = "cri-o"
ENRICHES = (NAME,)
ANNOTATIONS = {
    "io.kubernetes.container.name": "name",
    "io.kubernetes.pod.name": "pod_name",
    "io.kubernetes.pod.namespace": "pod_namespace",
    "io.kubernetes.pod.uid": "pod_uid",
    "io.kubernetes.cri-o.ImageName": "image",
}


def container_id(seg: str) -> str:
    """The id in a ``crio-<id>[.scope]`` segment, or ""."""
    cid = cgroup.scope_id(seg, "crio-")
    return cid if HEX_ID.fullmatch(cid) else ""


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        cid = cgroup.scope_id(seg, "crio-conmon-")
        if HEX_ID.fullmatch(cid):
            return i, Container(runtime=NAME, id=cid, details={"monitor": "conmon"})
        cid = container_id(seg)
        if cid:
            return i, Container(runtime=NAME, id=cid)
    return None


def has_state(cid: str, deadline: state.Deadline, root: str) -> bool:
    config = podman.bundle_config(cid, deadline, root)
    return bool(config) and any(k.startswith("io.kubernetes.cri-o.") for k in config.get("annotations") or {})


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.id or not HEX_ID.fullmatch(container.id):
        return
    config = podman.bundle_config(container.id, deadline, root)
    if config is None:
        raise FileNotFoundError(f"no CRI-O config.json for {container.id}")
    annotations = config.get("annotations") or {}
    for key, attribute in ANNOTATIONS.items():
        if state.text(annotations.get(key)):
            setattr(container, attribute, annotations[key])
    kind = state.text(annotations.get("io.kubernetes.cri-o.ContainerType"))
    if kind:
        container.details["container_type"] = kind
    podman.conmon_pids(container, deadline, root)
    container.state_confirmed()
