"""Which Azure Batch pool, job, task and node a crash ran in: the record's ``batch`` object.

The Batch agent passes ``AZ_BATCH_*`` variables to every task. A container task has them in its
container's configuration, which the runtime keeps in its own state (Docker's ``config.v2.json``
``Config.Env``, the OCI bundle's ``process.env`` under containerd): written by the agent, not by the
crashing process, so they are confirmed once the container is. A host task has them only in its own
environment, which the process may have changed: recorded, but unconfirmed. Either way the values are
input from outside corepipe: each is cut and stripped of control characters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

#: Variable -> the ``batch`` key it fills (Azure Batch's ids are at most 64 characters; node ids a little more).
VARIABLES = {"AZ_BATCH_POOL_ID": "pool", "AZ_BATCH_JOB_ID": "job", "AZ_BATCH_TASK_ID": "task",
             "AZ_BATCH_NODE_ID": "node"}
VALUE_MAX = 128
#: ``source`` of a host task's variables.
ENVIRON = "process environment"


def from_env(entries: object) -> Optional[dict]:
    """{pool, job, task, node} from ``NAME=value`` entries (the first of a name counts, as for getenv), each
    value bounded; None when none of the variables is there. ``entries`` comes from a state file or /proc:
    anything but a list of strings is ignored."""
    if not isinstance(entries, (list, tuple)):
        return None
    found: dict = {}
    for entry in _strings(entries):
        name, sep, value = entry.partition("=")
        key = VARIABLES.get(name) if sep else None
        if key is not None and key not in found:
            found[key] = bounded(value)
    if not found:
        return None
    return {key: found.get(key) for key in VARIABLES.values()}


def _strings(entries: Iterable) -> Iterable[str]:
    for entry in entries:
        if isinstance(entry, str) and entry.startswith("AZ_BATCH_"):
            yield entry


def bounded(value: str) -> str:
    """At most VALUE_MAX characters, every control character (C0, DEL, C1) replaced by '?'."""
    return "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in value[:VALUE_MAX])


def of_crash(container_batch: Optional[dict], container_confirmed: bool, runtime: str,
             environ: list) -> Optional[dict]:
    """The record's ``batch``. A confirmed container whose runtime's state was read for it
    (``container_batch`` not None: {} when the state has none of the variables) gets the state's, confirmed,
    and the process's own environment does not count: the process may have changed it. Anything else gets
    the process environment's, unconfirmed. None when there are no variables."""
    if container_confirmed and container_batch is not None:
        return {**container_batch, "confirmed": True, "source": f"{runtime} state"} if container_batch else None
    found = from_env(environ)
    return {**found, "confirmed": False, "source": ENVIRON} if found else None


def of_record(rec: dict) -> dict:
    """A record's (or a remote summary's) ``batch``, {} when it has none or it is not an object."""
    value = rec.get("batch")
    return value if isinstance(value, dict) else {}
