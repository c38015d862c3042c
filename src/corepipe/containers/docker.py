"""Docker / Moby: ``/docker/<id>`` (cgroupfs driver) and ``docker-<id>.scope`` (systemd driver)."""

from __future__ import annotations

import json
import os
from typing import Optional

from corepipe.containers import HEX_ID, Container

NAME = "docker"
STATE_ROOT = "/var/lib/docker/containers"


def match(segments: list) -> Optional[Container]:
    for i, seg in enumerate(segments):
        if seg.startswith("docker-") and seg.endswith(".scope") and HEX_ID.fullmatch(seg[7:-6]):
            return Container(runtime=NAME, id=seg[7:-6])
        if seg == "docker" and i + 1 < len(segments) and HEX_ID.fullmatch(segments[i + 1]):
            return Container(runtime=NAME, id=segments[i + 1])
    return None


def enrich(container: Container, deadline: float) -> None:
    if not container.id or not HEX_ID.fullmatch(container.id):
        return
    path = os.path.join(STATE_ROOT, container.id, "config.v2.json")
    with open(path, "rb") as f:
        config = json.loads(f.read(4 << 20))
    container.name = (config.get("Name") or "").lstrip("/") or None
    container.image = (config.get("Config") or {}).get("Image") or None
    container.details["image_id"] = config.get("Image")
    container.source = "cgroup+state"
