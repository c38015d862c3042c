"""Which container a crashed process belongs to, from its cgroup, its mounts and the runtimes' files on disk.

One small module per runtime family, each with ``match(segments, root)`` -> ``(index, Container)``
for the first cgroup path segment that names one of its containers, and ``enrich(container,
deadline, root)`` that adds name, image, pod and the init PID from the runtime's on-disk state.

``identify`` reads the cgroup alone: every container named along the path, outermost first (a
kind node, Docker in Docker, a pod on Fargate under ``/ecs/<task>``); the innermost is the answer,
the others are kept in ``outer``. ``enrich`` then confirms each from its runtime's state and the
process's namespaces (belongs.py): the innermost confirmed one is the container, and one that
cannot be confirmed never gets a container's policy group (model.py). A cgroup inside a user's
delegated subtree (``user@UID.service``) is that user's: a rootless container at most, attributed
to that uid; so is a crash of a subordinate uid of that user (``attribute``: platform/userns.py).
Nothing here talks to a daemon: the crashing process may be the daemon. ``root`` is "/" except in tests,
which replay real files under a temporary root.
"""

from __future__ import annotations

import re
from typing import Optional

from corepipe.domain.containers import (
    belongs,
    cgroup,
    containerd,
    crio,
    docker,
    ecs,
    evidence,
    garden,
    host,
    kubernetes,
    lxc,
    nspawn,
    podman,
    probe,
    runc,
    slicepath,
    state,
)
from corepipe.domain.containers.model import Container
from corepipe.platform import userns

_USER_MANAGER = re.compile(r"user@([0-9]{1,10})\.service")
_STATE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, TimeoutError)

#: Seconds of wall time reading runtime state may take. Wall time, since a blocked read (a FUSE file)
#: spends none of the CPU. 2 s: in a storm of 64 handlers on 2 CPUs each gets a thirtieth of a CPU, and
#: 0.5 s can run out before a few small files are read; the crash then goes unconfirmed, under its uid.
STATE_BUDGET = 2.0


def identify(cgroup_text: str, *, mountinfo: str = "", hostname: Optional[str] = None,
             root: str = "/") -> Container:
    """Decide from /proc/<pid>/cgroup, checked against the process's mounts and %h.

    Every distinct cgroup path (v2 first, then v1) is tried; the one naming the most containers (the
    first of those) gives the chain of containers along it: on a hybrid host an inner runtime may place
    its containers in the v1 hierarchies only. Where no path names one, bind mounts the runtimes make (a
    container's /etc/hostname from its state directory) are the fallback ("likely"), then a root
    filesystem that looks like a container's ("unknown", a "guess"); otherwise it is the host.
    """
    paths = cgroup.candidate_paths(cgroup_text)
    found, best = None, []
    for path in paths:
        chain = _chain(cgroup.segments(path), root)
        if len(chain) > len(best):  # a hybrid host's v2 path may stop at the outer container; a v1 one goes on
            best, where = chain, path
    if best:
        for link in best:
            link.cgroup = where
        found, found.outer = best[-1], best[:-1]
        _delegated(found, cgroup.segments(where))
    seen = evidence.from_mountinfo(mountinfo)
    if found is None:
        found = evidence.fallback(seen) or host.describe(paths)
    else:
        evidence.check(found, seen, hostname)
    if found.outer:
        found.details["outer"] = [_summary(link) for link in found.outer]
    return found


def _chain(segments: list, root: str) -> list:
    """Every container along one cgroup path, outermost first, each with its own cgroup (``details.scope``)."""
    chain, start = [], 0
    while start < len(segments):
        hit = _match(segments[start:], root)
        if hit is None:
            break
        index = start + hit[0]
        hit[1].details["scope"] = "/" + "/".join(segments[:index + 1])
        chain.append(hit[1])
        start = index + 1
    return chain


def _match(segments: list, root: str) -> Optional[tuple]:
    best = None
    for runtime in RUNTIMES:
        hit = runtime.match(segments, root)
        if hit is not None and (best is None or hit[0] < best[0]):
            best = hit
    return best


def _delegated(container: Container, segments: list) -> None:
    """Below ``user@UID.service`` only that user's own (rootless) runtime can have put the container."""
    for i, seg in enumerate(segments):
        owner = _USER_MANAGER.fullmatch(seg)
        if owner and container.scope.count("/") > i + 1:
            for link in [*container.outer, container]:
                link.details.update(rootless=True, owner_uid=int(owner.group(1)))
                link.unconfirmed(f"in the cgroup subtree systemd delegates to uid {owner.group(1)}: "
                                 f"that user's rootless container at most, attributed to that uid")
            return


def _summary(link: Container) -> dict:
    facts = {"runtime": link.runtime, "id": link.id, "name": link.name, "confidence": link.confidence,
             "scope": link.scope}
    if link.details.get("unconfirmed"):
        facts["unconfirmed"] = link.details["unconfirmed"]
    return {k: v for k, v in facts.items() if v is not None}


def enrich(container: Container, budget: float = STATE_BUDGET, root: str = "/", pid: Optional[int] = None,
           parent: Optional[int] = None, process: Optional[belongs.Process] = None) -> Container:
    """Read each container's state and check the process belongs to it, within ``budget`` seconds; never raises.

    Returns the container the crash belongs to: the innermost confirmed one (with the others in
    ``details.outer`` / ``details.inner``), else the innermost seen, unconfirmed. ``pid`` (the
    crashed process, host PID) lets Podman's name come from its conmon's command line when
    containers/storage does not list a confirmed container; ``parent``, its parent's PID when known.
    """
    deadline = state.Deadline(budget)
    links = [*container.outer, container]
    chosen = None
    for link in links:
        if link.is_host or link.details.get("rootless"):
            continue
        _read_state(link, deadline, root)
        try:
            why = belongs.check(link, process, deadline, root)
        except _STATE_ERRORS as exc:
            why = f"cannot check the process against the container's init: {exc}"
        if why is None:
            link.confidence = "certain"
            link.state_confirmed("pidns")
            link.details.pop("unconfirmed", None)
            chosen = link
        else:
            link.unconfirmed(why)
    chosen = chosen or container
    if chosen.confidence != "certain" and process is not None:
        _demote(chosen)
    at = links.index(chosen)
    chosen.outer = links[:at]
    chosen.details.pop("outer", None)
    if chosen.outer:
        chosen.details["outer"] = [_summary(link) for link in chosen.outer]
    if links[at + 1:]:
        chosen.details["inner"] = [_summary(link) for link in links[at + 1:]]
    if chosen.runtime == podman.NAME and chosen.name is None and pid is not None and chosen.confidence == "certain":
        try:
            podman.name_from_conmon(chosen, pid, deadline, root, parent)
        except _STATE_ERRORS as exc:
            chosen.errors.append(f"podman conmon: {exc}")
    return chosen


#: What the state says of a container; not the crash's own facts until the crash is confirmed to be in it.
_CLAIMED = ("name", "image", "pod_name", "pod_namespace")


def _demote(container: Container) -> None:
    """A crashed process not confirmed in its container keeps the id that was seen, but the names the runtime's
    state gives that id move to ``details.state_says``: a forger must not appear under its victim's name
    (``corepipe list``). Without a process (``resolve --cgroup-file``) the names stay."""
    said = {key: getattr(container, key) for key in _CLAIMED if getattr(container, key) is not None}
    if said and "+state" in container.source:
        container.details["state_says"] = said
        for key in said:
            setattr(container, key, None)


def _read_state(container: Container, deadline: state.Deadline, root: str) -> None:
    for runtime in RUNTIMES:
        if container.runtime in runtime.ENRICHES:
            try:
                runtime.enrich(container, deadline, root)
            except _STATE_ERRORS as exc:
                container.errors.append(f"{container.runtime} state: {exc}")
            return


def of_process(snap, proc, *, hostname: Optional[str]) -> Container:
    """The handler's answer for a trusted snapshot ``snap`` of the process capture.py read into ``proc``."""
    container = identify(snap.text("cgroup"), mountinfo=snap.text("mountinfo"), hostname=hostname)
    if container.is_host:
        return container
    try:
        parent = int(snap.status().get("PPid", ""))
    except ValueError:
        parent = None
    try:
        namespaces = belongs.pid_namespaces(proc.pid_ns_fd)
    except OSError as exc:
        container.errors.append(f"pid namespace: {exc}")
        namespaces = []
    process = belongs.Process(pid=snap.pid, pid_ns=namespaces, mnt_ns=proc.mnt_ns)
    return enrich(container, pid=snap.pid, parent=parent, process=process)


#: On a tie (two runtimes claim the same segment) the earlier module wins: kubernetes knows the pod.
RUNTIMES = (kubernetes, slicepath, ecs, docker, podman, crio, garden, containerd, runc, lxc, nspawn, probe)


def attribute(container: Container, uid: Optional[int], user_ns_fd: Optional[int]) -> None:
    """A crash of a uid that belongs to another user (a subordinate uid) counts under that user: the owner of the
    process's user namespace (a trusted snapshot's), else the user whose /etc/subuid range holds ``uid``. Never
    under root: a namespace or range of root's (a remapped daemon's) must not spend root's own limits."""
    if isinstance(container.details.get("owner_uid"), int) or not isinstance(uid, int):
        return
    owner, source = (userns.namespace_owner(user_ns_fd), "user namespace") if user_ns_fd is not None else (None, "")
    if owner is None:
        owner, source = userns.subuid_owner(uid), userns.SUBUID
    if owner not in (None, 0, uid):
        container.details.update(owner_uid=owner, owner_from=source)
