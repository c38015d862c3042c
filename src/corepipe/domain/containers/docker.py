"""Docker / Moby: ``/docker/<id>`` (cgroupfs driver) and ``docker-<id>.scope`` (systemd driver).

State: ``<data-root>/containers/<id>/config.v2.json`` (name, image, labels, the Azure Batch variables of
``Config.Env``, ``State.Pid``); data-root is /var/lib/docker unless /etc/docker/daemon.json says
otherwise. Labels that Kubernetes (dockershim, cri-dockerd) and Amazon ECS put on containers fill in
the pod fields. The init PID comes from ``State.Pid`` while ``State.Running``, else from the state
runc keeps for Docker (``/run/docker/runtime-runc/moby/<id>/state.json``, written when the container
is created): dockerd writes config.v2.json only after the start returns, so a process that crashes at
once (a handler that answers fast, like ``corepipe serve``) may find it not yet running.
"""

from __future__ import annotations

import os
from typing import Optional

from corepipe.domain import batch
from corepipe.domain.containers import cgroup, runc, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID

NAME = "docker"
ENRICHES = (NAME,)
DATA_ROOT = "var/lib/docker"
DAEMON_JSON = "etc/docker/daemon.json"
RUNC_ROOT = "run/docker/runtime-runc/moby"
#: Labels -> Container fields, from Kubernetes (dockershim / cri-dockerd) and Amazon ECS.
LABELS = {
    "io.kubernetes.pod.name": "pod_name",
    "io.kubernetes.pod.namespace": "pod_namespace",
    "io.kubernetes.pod.uid": "pod_uid",
}
ECS_LABELS = ("com.amazonaws.ecs.cluster", "com.amazonaws.ecs.task-arn", "com.amazonaws.ecs.container-name",
              "com.amazonaws.ecs.task-definition-family", "com.docker.compose.project",
              "com.docker.compose.service", "io.kubernetes.container.name")


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        cid = cgroup.scope_id(seg, "docker-")
        if seg.endswith(".scope") and HEX_ID.fullmatch(cid):
            return i, Container(runtime=NAME, id=cid)
        if seg == "docker" and i + 1 < len(segments) and HEX_ID.fullmatch(segments[i + 1]):
            return i + 1, Container(runtime=NAME, id=segments[i + 1])
    return None


def has_state(cid: str, root: str) -> bool:
    return state.exists(state.path(_data_root(root, None), "containers", cid, "config.v2.json"))


def _data_root(root: str, deadline: Optional[state.Deadline]) -> str:
    """Docker's data-root: daemon.json's "data-root" when it is an absolute path, else /var/lib/docker."""
    try:
        config = state.read_json(state.path(root, DAEMON_JSON), deadline or state.Deadline(0.1), 1 << 20)
        configured = state.text(config.get("data-root")) if isinstance(config, dict) else None
    except (OSError, ValueError):
        configured = None
    if configured and os.path.isabs(configured):
        return os.path.join(root, configured.lstrip("/"))
    return state.path(root, DATA_ROOT)


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.id or not HEX_ID.fullmatch(container.id):
        return
    config = state.read_json(state.path(_data_root(root, deadline), "containers", container.id, "config.v2.json"),
                             deadline)
    settings = config.get("Config") or {}
    container.name = (state.text(config.get("Name")) or "").lstrip("/") or container.name
    container.image = state.text(settings.get("Image")) or container.image
    container.details["image_id"] = state.text(config.get("Image"))
    labels = settings.get("Labels") or {}
    for label, attribute in LABELS.items():
        if state.text(labels.get(label)):
            setattr(container, attribute, labels[label])
    container.batch = batch.from_env(settings.get("Env")) or {}
    found = {k: labels[k] for k in ECS_LABELS if state.text(labels.get(k))}
    if found:
        container.details["labels"] = found
    running = config.get("State") or {}
    if running.get("Running") is True and state.positive_int(running.get("Pid")):
        container.details["init_pid"] = running["Pid"]
    else:
        _init_from_runc(container, deadline, root)
    container.state_confirmed()


def _init_from_runc(container: Container, deadline: state.Deadline, root: str) -> None:
    try:
        doc = state.read_json(runc.state_file(state.path(root, RUNC_ROOT), container.id), deadline)
    except FileNotFoundError:
        return  # the container is gone (or not made by runc): no init to check against
    init = state.positive_int(doc.get("init_process_pid")) if isinstance(doc, dict) else None
    if init:
        container.details["init_pid"] = init
