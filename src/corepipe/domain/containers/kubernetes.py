"""Kubernetes pods: ``kubepods`` cgroups, for every QoS class and both cgroup drivers.

- cgroupfs: ``/kubepods[/burstable|/besteffort]/pod<uid>/<id>`` (guaranteed pods have no QoS level);
  the container segment is a bare id, so which CRI runtime runs it is read from the state on disk.
- systemd: ``/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice/
  <prefix>-<id>.scope`` with prefix ``cri-containerd``, ``crio`` or ``docker`` (slice names carry the
  kubelet's cgroup root as a prefix when it has one: ``kubelet-kubepods-besteffort.slice``).
"""

from __future__ import annotations

import re
from typing import Optional

from corepipe.domain.containers import cgroup, containerd, crio, docker, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID, NAME, POD_UID

RUNTIME = "kubernetes"
ENRICHES = (RUNTIME,)
QOS = ("burstable", "besteffort")
#: ``kubepods.slice``, ``kubepods-burstable.slice``; with a kubelet ``--cgroup-root`` (kind) ``kubelet-kubepods...``.
_KUBEPODS = re.compile(r"(?:[A-Za-z0-9_]+-)?kubepods[.-]")
_SCOPES = (("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("docker-", "docker"))


def match(segments: list, root: str) -> Optional[tuple]:
    start = next((i for i, s in enumerate(segments) if s == "kubepods" or _KUBEPODS.match(s)), None)
    if start is None:
        return None
    qos, pod = "guaranteed", None
    for i in range(start, len(segments)):
        seg = segments[i]
        if seg in QOS or qos_of(seg) != "guaranteed":
            qos = seg if seg in QOS else qos_of(seg)
        uid = pod_uid(seg)
        if uid:
            pod = uid
            continue
        if pod is None:
            continue
        for prefix, runtime in _SCOPES:
            cid = cgroup.scope_id(seg, prefix)
            if HEX_ID.fullmatch(cid):
                return i, Container(runtime=runtime, id=cid, pod_uid=pod, details={"qos": qos})
        if seg.startswith("crio-conmon-"):
            return None
        if HEX_ID.fullmatch(seg) or NAME.fullmatch(seg):
            return i, Container(runtime=RUNTIME, id=seg, pod_uid=pod, details={"qos": qos})
    return None


def qos_of(seg: str) -> str:
    """The QoS class a systemd-driver slice name says (guaranteed pods have no QoS slice)."""
    return next((level for level in QOS if f"kubepods-{level}." in seg or f"kubepods-{level}-" in seg),
                "guaranteed")


def pod_uid(seg: str) -> Optional[str]:
    """``pod<uid>`` (cgroupfs) or ``kubepods[-<qos>]-pod<uid_with_underscores>.slice`` (systemd)."""
    if seg.startswith("pod"):
        uid = seg[3:]
    elif _KUBEPODS.match(seg) and "-pod" in seg and seg.endswith(".slice"):
        uid = seg[seg.rindex("-pod") + 4:-6].replace("_", "-")
    else:
        return None
    return uid if POD_UID.fullmatch(uid) else None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    """A bare id below a pod: the runtime whose state has this id runs it."""
    cid = container.id or ""
    if HEX_ID.fullmatch(cid) or NAME.fullmatch(cid):
        if containerd.namespace_of(cid, root):
            container.runtime = containerd.NAME
            return containerd.enrich(container, deadline, root)
        if HEX_ID.fullmatch(cid) and crio.has_state(cid, deadline, root):
            container.runtime = crio.NAME
            return crio.enrich(container, deadline, root)
        if HEX_ID.fullmatch(cid) and docker.has_state(cid, root):
            container.runtime = docker.NAME
            return docker.enrich(container, deadline, root)
    container.errors.append("no containerd, CRI-O or Docker state names this container")
    return None
