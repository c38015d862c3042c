"""systemd machines: ``machine.slice/machine-<name>.scope`` (systemd-nspawn; libvirt's ``qemu-N-<vm>``).

systemd escapes the unit name (``\\x2d`` for '-'); ``/run/systemd/machines/<name>`` describes
the machine (class, root directory, service).
"""

from __future__ import annotations

import re
from typing import Optional

from corepipe.domain.containers import cgroup, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import NAME

RUNTIME = "nspawn"
ENRICHES = (RUNTIME, "libvirt")
MACHINES = "run/systemd/machines"
_LIBVIRT = re.compile(r"(qemu|lxc)-[0-9]+-(.+)")


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        if i and segments[i - 1] == "machine.slice" and seg.startswith("machine-") and seg.endswith(".scope"):
            machine = cgroup.unescape(cgroup.scope_id(seg, "machine-"))
            if not NAME.fullmatch(machine):
                return None
            libvirt = _LIBVIRT.fullmatch(machine)
            if libvirt:
                return i, Container(runtime="libvirt", id=machine, name=libvirt.group(2),
                                    details={"driver": libvirt.group(1)})
            return i, Container(runtime=RUNTIME, id=machine, name=machine)
    return None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.id or not NAME.fullmatch(container.id):
        return
    info = {}
    for line in state.read(state.path(root, MACHINES, container.id), deadline, 65536).decode(errors="replace") \
            .splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("CLASS", "ROOT", "SERVICE", "SCOPE", "LEADER"):
            info[key.lower()] = value
    leader = info.pop("leader", "")
    container.details.update(info)
    if leader.isdigit():
        container.details["init_pid"] = int(leader)
    container.state_confirmed()
