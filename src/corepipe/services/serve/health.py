"""The resident collector's files in its run directory, written by the server and read by ``status``, the metrics
process, the guardian and a restarted server without loading the server itself: ``serve.json``, its health (pid,
heartbeat, counts), and ``pattern.json``, the socket pattern it owns with the fallback to put back (kept until the
fallback is back, so a server killed with its guardian leaves a restarted server and ``status`` the way back)."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from corepipe.platform import procfs
from corepipe.platform.fs import unlink_if_present

RUN_DIR = "/run/corepipe"
HEALTH = "serve.json"
OWNED = "pattern.json"
#: How often the server rewrites it; a heartbeat older than STALE seconds means the server is stuck.
HEARTBEAT = 2.0
STALE = 15.0


def read_health(run_dir: str = RUN_DIR) -> Optional[dict]:
    """The running server's health file with ``alive`` (its pid is still the process that wrote it, alive: the
    same start time, so neither a server that died without removing it, reaped or not, nor a later process given
    its pid) and ``fresh`` (heartbeat within STALE seconds); None when there is none."""
    try:
        with open(os.path.join(run_dir, HEALTH), "rb") as f:
            health = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(health, dict):
        return None
    try:
        stat = procfs.read(int(health["pid"]), "stat")
        alive = health.get("pid_start") is not None and procfs.start_ticks(stat) == health["pid_start"] \
            and not procfs.exited(stat)
    except (OSError, ValueError, TypeError, KeyError):
        alive = False
    health["alive"] = alive
    health["fresh"] = alive and time.time() - float(health.get("heartbeat") or 0) < STALE
    return health


def write_health(run_dir: str, health: dict) -> None:
    """Replace the health file at once (a reader never sees half of it), stamped with this process's start time
    (``pid_start``: what tells ``read_health`` it is still the writer); OSError when it cannot be written."""
    _replace(os.path.join(run_dir, HEALTH), {**health, "pid_start": procfs.started("self")})


def remove_health(run_dir: str) -> None:
    unlink_if_present(os.path.join(run_dir, HEALTH))


def write_owned(run_dir: str, pattern: str, fallback: Optional[str]) -> None:
    """Note the socket pattern the server wrote and the fallback to put back; OSError when it cannot be written."""
    _replace(os.path.join(run_dir, OWNED), {"pattern": pattern, "fallback": fallback})


def read_owned(run_dir: str = RUN_DIR) -> Optional[dict]:
    """``{"pattern", "fallback"}`` a server noted, or None (none, or not two strings)."""
    try:
        with open(os.path.join(run_dir, OWNED), "rb") as f:
            owned = json.loads(f.read(1 << 14))
    except (OSError, ValueError):
        return None
    if not isinstance(owned, dict) or not isinstance(owned.get("pattern"), str) or \
            not isinstance(owned.get("fallback"), (str, type(None))):
        return None
    return {"pattern": owned["pattern"], "fallback": owned["fallback"]}


def forget_owned(run_dir: str) -> None:
    unlink_if_present(os.path.join(run_dir, OWNED))


def _replace(path: str, content: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(content, f)
    os.rename(tmp, path)
