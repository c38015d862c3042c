"""Not in a container: a system service, a user session, or the root cgroup."""

from __future__ import annotations

from corepipe.domain.containers import cgroup
from corepipe.domain.containers.model import Container


def describe(paths: list) -> Container:
    """A host result naming the systemd unit (``cron.service``, ``session-3.scope``) when there is one.

    ``details.system_unit`` (the policy group) is the outermost unit below ``system.slice`` (or
    ``init.scope``) in the process's first cgroup path: only root places processes there, and a
    service's own delegated subtree stays that service's. Sessions and user services are not
    system units: they count under the uid.
    """
    container = Container(runtime="host", cgroup=paths[0] if paths else None)
    for path in paths:
        units = [s for s in cgroup.segments(path) if s.endswith((".service", ".scope"))]
        if units:
            container.details["unit"] = cgroup.unescape(units[-1])
            break
    parts = cgroup.segments(paths[0]) if paths else []
    if parts[:1] == ["init.scope"]:
        container.details["system_unit"] = "init.scope"
    elif len(parts) >= 2 and parts[0] == "system.slice" and parts[1].endswith((".service", ".scope")):
        container.details["system_unit"] = cgroup.unescape(parts[1])
    return container
