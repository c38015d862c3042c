"""The kubelet's systemd-driver cgroupsPath written literally: ``<parent>.slice:<prefix>:<id>``.

When the runtime's cgroup driver is cgroupfs but the kubelet's is systemd (cgroup v1 and hybrid
hosts), runc takes the OCI ``cgroupsPath`` "slice:prefix:name" as a directory name, under any
parent: ``/kubepods-burstable-pod<uid>.slice:cri-containerd:<id>``,
``/system.slice/containerd.service/kubepods-...slice:cri-containerd:<id>``, or a non-kubepods slice.
The id is the last field; the prefix names the runtime.
"""

from __future__ import annotations

import re
from typing import Optional

from corepipe.domain.containers import kubernetes
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID, NAME

ENRICHES = ()
_FORM = re.compile(r"([A-Za-z0-9_.@-]+\.slice):([A-Za-z0-9_-]+):(.+)")
PREFIXES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", "libpod": "podman"}


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        found = _FORM.fullmatch(seg)
        if not found:
            continue
        parent, prefix, cid = found.groups()
        runtime = PREFIXES.get(prefix, "containerd" if NAME.fullmatch(cid) else None)
        if runtime is None or not (HEX_ID.fullmatch(cid) or NAME.fullmatch(cid)):
            return None
        container = Container(runtime=runtime, id=cid, details={"cgroup_parent": parent, "cgroup_prefix": prefix})
        pod_uid = kubernetes.pod_uid(parent)
        if pod_uid:
            container.pod_uid = pod_uid
            container.details["qos"] = kubernetes.qos_of(parent)
        return i, container
    return None
