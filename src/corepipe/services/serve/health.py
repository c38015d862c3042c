"""The resident collector's health file, ``<run_dir>/serve.json`` (pid, heartbeat, counts): written by the server,
read by ``status``, the metrics process and tests without loading the server itself."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from corepipe.platform import procfs
from corepipe.platform.fs import unlink_if_present

RUN_DIR = "/run/corepipe"
HEALTH = "serve.json"
#: How often the server rewrites it; a heartbeat older than STALE seconds means the server is stuck.
HEARTBEAT = 2.0
STALE = 15.0


def read_health(run_dir: str = RUN_DIR) -> Optional[dict]:
    """The running server's health file with ``alive`` (its pid is a corepipe serve) and ``fresh``
    (heartbeat within STALE seconds); None when there is none."""
    try:
        with open(os.path.join(run_dir, HEALTH), "rb") as f:
            health = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(health, dict):
        return None
    try:
        alive = b"serve" in procfs.read(int(health.get("pid", 0)), "cmdline")
    except (OSError, ValueError, TypeError):
        alive = False
    health["alive"] = alive
    health["fresh"] = alive and time.time() - float(health.get("heartbeat") or 0) < STALE
    return health


def write_health(run_dir: str, health: dict) -> None:
    """Replace the health file at once (a reader never sees half of it); OSError when it cannot be written."""
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    path = os.path.join(run_dir, HEALTH)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(health, f)
    os.rename(tmp, path)


def remove_health(run_dir: str) -> None:
    unlink_if_present(os.path.join(run_dir, HEALTH))
