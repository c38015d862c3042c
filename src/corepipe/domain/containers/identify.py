"""Which container a crashed process belongs to, from its cgroup, its mounts and the runtimes' files on disk.

One small module per runtime family, each with ``match(segments, root)`` -> ``(index, Container)``
for the first cgroup path segment that names one of its containers, and ``enrich(container,
deadline, root)`` that adds name, image and pod from the runtime's on-disk state. The match at
the smallest index wins: the outermost container scope is the container, whatever a (possibly
privileged) process created below it. Nothing here talks to a daemon: the crashing process may
be the daemon. ``root`` is "/" except in tests, which replay real files under a temporary root.
"""

from __future__ import annotations

from typing import Optional

from corepipe.domain.containers import (
    cgroup,
    containerd,
    crio,
    docker,
    ecs,
    evidence,
    host,
    kubernetes,
    lxc,
    nspawn,
    podman,
    probe,
    runc,
    state,
)
from corepipe.domain.containers.model import Container


def identify(cgroup_text: str, *, mountinfo: str = "", hostname: Optional[str] = None,
             root: str = "/") -> Container:
    """Decide from /proc/<pid>/cgroup, checked against the process's mounts and %h.

    Every distinct cgroup path (v2 first, then v1) is tried; in a path the outermost container
    scope wins. Where no path names a container, bind mounts the runtimes make (a container's
    /etc/hostname from its state directory) are the fallback ("likely"), then a root filesystem
    that looks like a container's ("unknown", a "guess"); otherwise it is the host.
    """
    paths = cgroup.candidate_paths(cgroup_text)
    found = None
    for path in paths:
        found = _match(cgroup.segments(path), root)
        if found is not None:
            found.cgroup = path
            break
    seen = evidence.from_mountinfo(mountinfo)
    if found is None:
        found = evidence.fallback(seen) or host.describe(paths)
    else:
        evidence.check(found, seen, hostname)
    return found


def _match(segments: list, root: str) -> Optional[Container]:
    best = None
    for runtime in RUNTIMES:
        hit = runtime.match(segments, root)
        if hit is not None and (best is None or hit[0] < best[0]):
            best = hit
    return best[1] if best else None


_STATE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, TimeoutError)


def enrich(container: Container, budget: float = 0.5, root: str = "/", pid: Optional[int] = None,
           parent: Optional[int] = None) -> Container:
    """Add name, image and pod from the runtime's on-disk state, within ``budget`` seconds; never raises.

    ``pid`` (the crashed process, host PID) lets Podman's name come from its conmon's command
    line when containers/storage does not list the container; ``parent``, its parent's PID when
    known (the handler's snapshot has it; the process itself may be gone).
    """
    deadline = state.Deadline(budget)
    for runtime in RUNTIMES:
        if container.runtime in runtime.ENRICHES:
            try:
                runtime.enrich(container, deadline, root)
            except _STATE_ERRORS as exc:
                container.errors.append(f"{container.runtime} state: {exc}")
                if container.confidence == "certain" and "state" not in container.source:
                    container.confidence = "likely"
            break
    if container.runtime == podman.NAME and container.name is None and pid is not None:
        try:
            podman.name_from_conmon(container, pid, deadline, root, parent)
        except _STATE_ERRORS as exc:
            container.errors.append(f"podman conmon: {exc}")
    return container



#: On a tie (two runtimes claim the same segment) the earlier module wins: kubernetes knows the pod.
RUNTIMES = (kubernetes, ecs, docker, podman, crio, containerd, runc, lxc, nspawn, probe)
