"""Which container a crashed process belongs to, from its cgroup and the runtimes' files on disk.

Each runtime family has a small module with ``match(paths)`` (does this cgroup name one
of its containers?) and, where it keeps state on disk, ``enrich(container, deadline)``.
Nothing here talks to a daemon: the crashing process may be the daemon.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from corepipe.containers import cgroup

HEX_ID = re.compile(r"[0-9a-f]{64}")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class Container:
    #: "host", "docker", "containerd", "cri-o", "podman", "runc", ... ("unknown": looks contained, no runtime matched).
    runtime: str = "host"
    id: Optional[str] = None
    name: Optional[str] = None
    image: Optional[str] = None
    pod_name: Optional[str] = None
    pod_namespace: Optional[str] = None
    pod_uid: Optional[str] = None
    #: The cgroup path the decision was made from.
    cgroup: Optional[str] = None
    #: How the answer was reached ("cgroup", "cgroup+state", ...) and how sure it is ("certain", "likely", "guess").
    source: str = "cgroup"
    confidence: str = "certain"
    #: Extra facts from the runtime's state files (bundle path, labels, ...), and why enrichment failed.
    details: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)

    @property
    def is_host(self) -> bool:
        return self.runtime == "host"

    def to_dict(self) -> dict:
        return asdict(self)

    def directory(self) -> tuple:
        """The store path components for this container, built only from validated or sanitised text."""
        if self.is_host:
            return ("host",)
        return (safe_name(self.runtime), safe_name(self.id or self.name or "unknown"))


def safe_name(text: str, limit: int = 100) -> str:
    """A file name made of [A-Za-z0-9_.-], never '.', '..' or hidden; altered names get a hash suffix."""
    cleaned = _SAFE.sub("_", text)[:limit].lstrip(".") or "_"
    if cleaned != text:
        import hashlib

        cleaned = f"{cleaned[:limit - 9]}-{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return cleaned


def identify(cgroup_text: str) -> Container:
    """Decide from /proc/<pid>/cgroup alone; the first (outermost) container scope in the path wins."""
    for path in cgroup.candidate_paths(cgroup_text):
        segments = cgroup.segments(path)
        for runtime in RUNTIMES:
            found = runtime.match(segments)
            if found is not None:
                found.cgroup = path
                return found
    paths = cgroup.candidate_paths(cgroup_text)
    return Container(runtime="host", cgroup=paths[0] if paths else None)


def enrich(container: Container, budget: float = 0.5) -> Container:
    """Add name, image and pod from the runtime's on-disk state, within ``budget`` seconds."""
    deadline = time.monotonic() + budget
    for runtime in RUNTIMES:
        if runtime.NAME == container.runtime or container.runtime in getattr(runtime, "ALSO", ()):
            try:
                runtime.enrich(container, deadline)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                container.errors.append(f"{runtime.NAME} state: {exc}")
    return container


from corepipe.containers import docker, kubernetes, podman, runc  # noqa: E402

#: Checked in this order for each cgroup path segment list.
RUNTIMES = (kubernetes, docker, podman, runc)
