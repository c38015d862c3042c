"""The fleet-wide core budget per signature: a bad rollout must not ship thousands of identical cores.

The first N crashes (of any node) to ship a core of one signature each claim one of N marker objects,
``<prefix>/_budget/v1/<signature hash>/<1..N>``, with a conditional create (If-None-Match: * on S3 and Azure):
the store decides, so of nodes racing for the last marker exactly one wins. A crash that finds all N taken
ships its record only; its core stays on the node under the local policy (docs/shipping.md, "Core budget").
"""

from __future__ import annotations

import json
import re
from typing import Optional

from corepipe.platform.objectstore import Destination, DestinationError

DIRECTORY = "_budget/v1"
#: ship-progress.json's field for the decision
PROGRESS = "budget"
#: The decision kept in ship-progress.json: this crash's marker key, or SPENT, or CLAIMING (killed mid-claim).
SPENT = "spent"
CLAIMING = "claiming"
_HASH = re.compile(r"[0-9a-f]{8,64}")
_MARKER_MAX = 4096


def signature(rec: dict) -> Optional[str]:
    """The signature hash a crash's core is budgeted under; None (no budget) for a crash without one."""
    value = (rec.get("signature") or {}).get("hash") if isinstance(rec.get("signature"), dict) else None
    return value if isinstance(value, str) and _HASH.fullmatch(value) else None


def _root(prefix: str, hash_: str) -> str:
    return "/".join(p for p in (prefix, DIRECTORY, hash_) if p) + "/"


def _mine(destination: Destination, key: str, node: str, crash: str) -> bool:
    """Whether the marker at ``key`` names this node's crash (read at most a few KiB: any node wrote it)."""
    data = bytearray()

    def write(chunk: bytes) -> None:
        data.extend(chunk)
        if len(data) > _MARKER_MAX:
            raise DestinationError(f"{key} is larger than a budget marker")
    try:
        destination.get(key, write)
        value = json.loads(bytes(data))
    except (DestinationError, ValueError):
        return False
    return isinstance(value, dict) and value.get("node") == node and value.get("crash") == crash


def claim(destination: Destination, hash_: str, budget: int, node: str, crash: str, resumed: bool) -> Optional[str]:
    """The key of the marker this crash holds, claimed now; None when the signature's ``budget`` markers are
    all held by other crashes. ``resumed``: a claim of this crash may have been made before a kill, so a taken
    marker naming it is its own."""
    root = _root(destination.location.prefix, hash_)
    slots = [f"{root}{number}" for number in range(1, budget + 1)]
    taken = {info.key for info in destination.list(root)} & set(slots)  # anything else there is not a marker
    if resumed:
        for key in sorted(taken):
            if _mine(destination, key, node, crash):
                return key
    body = json.dumps({"node": node, "crash": crash}).encode()
    for key in slots:
        if key not in taken and destination.create(key, body, {"node": node, "crash": crash}):
            return key
    return None
