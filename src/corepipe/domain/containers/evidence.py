"""Evidence besides the cgroup: the bind mounts a runtime makes, and the hostname (%h).

Docker bind-mounts ``<data-root>/containers/<id>/{hostname,hosts,resolv.conf}`` into each
container and Podman/CRI-O ``.../overlay-containers/<id>/userdata/...``; the mount's root in
/proc/<pid>/mountinfo names the container id even when the cgroup does not (a process that
left its container's cgroup, a custom cgroup layout). The kubelet's ``pods/<uid>/`` mounts
name the pod. Docker and Podman name a container's host after the first 12 hex digits of
its id unless told otherwise.
"""

from __future__ import annotations

import re
from typing import Optional

from corepipe.domain.containers.model import Container
from corepipe.platform import procfs

_DOCKER = re.compile(r"/containers/([0-9a-f]{64})/(?:hostname|hosts|resolv\.conf)$")
_STORAGE = re.compile(r"-containers/([0-9a-f]{64})/userdata/(?:hostname|hosts|resolv\.conf)$")
_KUBELET = re.compile(r"/pods/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/etc-hosts$")
#: Root filesystem types a container runtime uses and a host seldom boots from.
_CONTAINER_ROOTS = ("overlay", "aufs", "fuse-overlayfs")
#: Only a runtime mounts these files over the process's own /etc.
_TARGETS = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def from_mountinfo(mountinfo: str) -> dict:
    """{"docker": id, "storage": id, "pod_uid": uid, "root": ...} from the mounts over /etc and of /."""
    seen: dict = {}
    for mount in procfs.mounts(mountinfo):
        mount_root, target = mount.root, mount.target
        if target == "/":
            seen["root"] = {"device": mount.device, "root": mount_root, "type": mount.fstype}
        if target not in _TARGETS:
            continue
        for key, pattern in (("docker", _DOCKER), ("storage", _STORAGE), ("pod_uid", _KUBELET)):
            found = pattern.search(mount_root)
            if found and key not in seen:
                seen[key] = found.group(1)
    return seen


def fallback(seen: dict) -> Optional[Container]:
    """A container named by mounts alone (the cgroup named none)."""
    if "docker" in seen:
        return Container(runtime="docker", id=seen["docker"], source="mountinfo", confidence="likely",
                         pod_uid=seen.get("pod_uid"))
    if "storage" in seen:
        return Container(runtime="podman", id=seen["storage"], source="mountinfo", confidence="likely",
                         pod_uid=seen.get("pod_uid"))
    root = seen.get("root")
    if root and (root["root"] != "/" or root["type"] in _CONTAINER_ROOTS):
        return Container(runtime="unknown", source="mountinfo", confidence="guess", details={"root_mount": root})
    return None


def check(container: Container, seen: dict, hostname: Optional[str]) -> None:
    """Note where the mounts and hostname agree with the cgroup's answer, and flag a contradiction."""
    agrees, conflicts = [], []
    ids = {seen[k] for k in ("docker", "storage") if k in seen}
    if ids and container.id in ids:
        agrees.append("mountinfo")
    elif ids and container.runtime in ("docker", "podman"):
        conflicts.append(f"mountinfo names container {sorted(ids)[0]}")
    if seen.get("pod_uid") and container.pod_uid:
        (agrees if seen["pod_uid"] == container.pod_uid else conflicts).append(
            "kubelet mounts" if seen["pod_uid"] == container.pod_uid else f"kubelet mounts name pod {seen['pod_uid']}")
    if hostname and container.id and len(container.id) >= 12 and hostname == container.id[:12]:
        agrees.append("hostname")
    if agrees:
        container.details["evidence"] = agrees
    if conflicts:
        container.details["conflicts"] = conflicts
        container.confidence = "likely"
