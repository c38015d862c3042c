"""Not in a container: a system service, a user session, or the root cgroup."""

from __future__ import annotations

from corepipe.domain.containers import cgroup
from corepipe.domain.containers.model import Container


def describe(paths: list) -> Container:
    """A host result naming the systemd unit (``cron.service``, ``session-3.scope``) when there is one."""
    container = Container(runtime="host", cgroup=paths[0] if paths else None)
    for path in paths:
        units = [s for s in cgroup.segments(path) if s.endswith((".service", ".scope"))]
        if units:
            container.details["unit"] = cgroup.unescape(units[-1])
            break
    return container
