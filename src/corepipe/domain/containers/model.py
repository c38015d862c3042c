"""The container a crash is filed under: what is known of it, and the policy group it counts against."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class Container:
    #: "host", "docker", "containerd", "cri-o", "podman", "runc", "lxc", "nspawn", "garden", "kubernetes" (a pod
    #: whose CRI runtime left no state to tell which), "unknown" (no trustworthy data).
    runtime: str = "host"
    id: Optional[str] = None
    name: Optional[str] = None
    image: Optional[str] = None
    pod_name: Optional[str] = None
    pod_namespace: Optional[str] = None
    pod_uid: Optional[str] = None
    #: The cgroup path the decision was made from.
    cgroup: Optional[str] = None
    #: How the answer was reached ("cgroup", "cgroup+state+pidns", "mountinfo", ...) and how sure it is:
    #: "certain" only when the runtime's state confirms the container and the process is in its init's PID
    #: namespace; "likely" or "guess" otherwise, with ``details["unconfirmed"]`` saying why.
    source: str = "cgroup"
    confidence: str = "likely"
    #: Extra facts (QoS class, namespace, bundle, labels, evidence, outer containers), and why enrichment failed.
    details: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    #: The containers seen around this one in the cgroup path, outermost first (in the record as details.outer).
    outer: list = field(default_factory=list, repr=False)
    #: The Azure Batch variables of the container's configuration, from its runtime's state (domain/batch.py):
    #: None when no state with its environment was read, {} when it has none (the record's ``batch``).
    batch: Optional[dict] = field(default=None, repr=False)

    @property
    def is_host(self) -> bool:
        return self.runtime == "host"

    @property
    def scope(self) -> str:
        """The container's own cgroup (the path up to its segment): its init must be in it or below."""
        return self.details.get("scope") or self.cgroup or ""

    def to_dict(self) -> dict:
        result = asdict(self)
        del result["outer"], result["batch"]
        return result

    def state_confirmed(self, how: str = "state") -> None:
        """The runtime's state on disk names this container: record it (the process is checked apart)."""
        if "+" + how not in self.source:
            self.source += "+" + how

    def unconfirmed(self, why: str) -> None:
        """Not a container identity that may spend a container's limits: say why."""
        self.details["unconfirmed"] = why
        if self.confidence == "certain":
            self.confidence = "likely"

    def policy_group(self, uid: Optional[int]) -> tuple:
        """The key the storage policy and rate limits count this crash under (its store directory).

        A container only when its identity is confirmed (state + the process in its init's PID
        namespace); a host process under its system unit; everything else under the uid it is
        attributed to (a rootless runtime's owner, the user a subordinate uid belongs to, else the
        crashing uid), so nobody can spend
        another container's or another user's limits, or evict their cores. Without a uid (bad kernel
        arguments): ``unknown/unknown``.
        """
        if self.confidence == "certain" and not self.is_host and self.runtime != "unknown":
            return (safe_name(self.runtime), safe_name(self.id or self.name or "unknown"))
        if self.is_host and self.details.get("system_unit"):
            return ("host", safe_name(self.details["system_unit"]))
        owner = self.details.get("owner_uid")
        owner = owner if isinstance(owner, int) else uid
        return ("uid", str(owner)) if isinstance(owner, int) else ("unknown", "unknown")


def safe_name(text: str, limit: int = 100) -> str:
    """A file name made of [A-Za-z0-9_.-], never '.', '..' or hidden; altered names get a hash suffix."""
    cleaned = _SAFE.sub("_", text)[:limit].lstrip(".") or "_"
    if cleaned != text:
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        cleaned = f"{cleaned[:limit - 9]}-{digest}"
    return cleaned
