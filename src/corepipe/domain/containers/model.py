"""The container a crash is filed under: what is known of it, and the store directory it maps to."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class Container:
    #: "host", "docker", "containerd", "cri-o", "podman", "runc", "lxc", "nspawn", "kubernetes" (a pod whose
    #: CRI runtime left no state to tell which), "unknown" (no trustworthy data).
    runtime: str = "host"
    id: Optional[str] = None
    name: Optional[str] = None
    image: Optional[str] = None
    pod_name: Optional[str] = None
    pod_namespace: Optional[str] = None
    pod_uid: Optional[str] = None
    #: The cgroup path the decision was made from.
    cgroup: Optional[str] = None
    #: How the answer was reached ("cgroup", "cgroup+state", "mountinfo", ...) and how sure it is
    #: ("certain": the runtime's own naming or state confirms it, "likely": one indirect sign, "guess").
    source: str = "cgroup"
    confidence: str = "certain"
    #: Extra facts (QoS class, namespace, bundle, labels, evidence), and why enrichment failed.
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

    def confirmed(self, how: str = "state") -> None:
        """The runtime's state agrees with the cgroup: record it."""
        if "+" + how not in self.source:
            self.source += "+" + how
        self.confidence = "certain"


def safe_name(text: str, limit: int = 100) -> str:
    """A file name made of [A-Za-z0-9_.-], never '.', '..' or hidden; altered names get a hash suffix."""
    cleaned = _SAFE.sub("_", text)[:limit].lstrip(".") or "_"
    if cleaned != text:
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        cleaned = f"{cleaned[:limit - 9]}-{digest}"
    return cleaned
