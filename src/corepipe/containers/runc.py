"""runc used directly: the cgroup is ``/<id>`` and runc keeps ``/run/runc/<id>/state.json``."""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from corepipe.containers import Container

NAME = "runc"
STATE_ROOT = "/run/runc"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def match(segments: list) -> Optional[Container]:
    if len(segments) >= 1 and _ID.fullmatch(segments[0]):
        try:
            os.stat(os.path.join(STATE_ROOT, segments[0], "state.json"))
        except OSError:
            return None
        return Container(runtime=NAME, id=segments[0], name=segments[0], source="cgroup+state")
    return None


def enrich(container: Container, deadline: float) -> None:
    if not container.id or not _ID.fullmatch(container.id):
        return
    with open(os.path.join(STATE_ROOT, container.id, "state.json"), "rb") as f:
        state = json.loads(f.read(4 << 20))
    bundle = (state.get("config") or {}).get("labels") or []
    for label in bundle:
        if isinstance(label, str) and label.startswith("bundle="):
            container.details["bundle"] = label[7:]
