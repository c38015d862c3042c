"""containerd: plain (``ctr``, nerdctl) and as Kubernetes' CRI runtime.

Plain containerd puts a container in ``/<namespace>/<id>`` (cgroupfs) or ``nerdctl-<id>.scope``;
its runc shim keeps ``/run/containerd/runc/<namespace>/<id>/state.json``, whose bundle
(``/run/containerd/io.containerd.runtime.v2.task/<namespace>/<id>``) holds the OCI config.json.
Under CRI that config's annotations name the pod, namespace, container and image.
"""

from __future__ import annotations

import os
from typing import Optional

from corepipe.domain.containers import cgroup, runc, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID
from corepipe.domain.containers.state import NAME as VALID_NAME

NAME = "containerd"
ENRICHES = (NAME,)
RUNC_ROOT = "run/containerd/runc"
TASK_ROOT = "run/containerd/io.containerd.runtime.v2.task"
CRI_NAMESPACE = "k8s.io"
ANNOTATIONS = {
    "io.kubernetes.cri.container-name": "name",
    "io.kubernetes.cri.image-name": "image",
    "io.kubernetes.cri.sandbox-name": "pod_name",
    "io.kubernetes.cri.sandbox-namespace": "pod_namespace",
    "io.kubernetes.cri.sandbox-uid": "pod_uid",
}


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        cid = cgroup.scope_id(seg, "nerdctl-")
        if seg.endswith(".scope") and HEX_ID.fullmatch(cid):
            return i, Container(runtime=NAME, id=cid, details={"client": "nerdctl"})
        if i and VALID_NAME.fullmatch(segments[i - 1]) and VALID_NAME.fullmatch(seg) \
                and state.exists(runc.state_file(state.path(root, RUNC_ROOT, segments[i - 1]), seg)):
            return i, Container(runtime=NAME, id=seg, details={"namespace": segments[i - 1]})
    return None


def namespace_of(cid: str, root: str) -> Optional[str]:
    """The containerd namespace that has a runc state for ``cid`` (k8s.io first)."""
    base = state.path(root, RUNC_ROOT)
    try:
        namespaces = sorted(os.listdir(base), key=lambda n: n != CRI_NAMESPACE)
    except OSError:
        return None
    for namespace in namespaces:
        if VALID_NAME.fullmatch(namespace) and state.exists(runc.state_file(state.path(base, namespace), cid)):
            return namespace
    return None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    cid = container.id
    if not cid or not VALID_NAME.fullmatch(cid):
        return
    namespace = container.details.get("namespace") or namespace_of(cid, root)
    if not namespace or not VALID_NAME.fullmatch(namespace):
        raise FileNotFoundError(f"no containerd runc state for {cid}")
    container.details["namespace"] = namespace
    runc.read_state(state.path(root, RUNC_ROOT, namespace), cid, container, deadline)
    if container.details.get("state_cgroup_matches") is not False:
        container.state_confirmed()
    container.details.setdefault("bundle", "/" + state.path(TASK_ROOT, namespace, cid))
    annotations = runc.bundle_annotations(container, deadline, root)
    for key, attribute in ANNOTATIONS.items():
        if annotations.get(key):
            setattr(container, attribute, annotations[key])
    kind = annotations.get("io.kubernetes.cri.container-type")
    if kind:
        container.details["container_type"] = kind
    if container.name is None and namespace != CRI_NAMESPACE:
        container.name = cid  # ctr has no names apart from the id
