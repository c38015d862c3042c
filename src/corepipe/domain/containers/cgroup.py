"""A process's cgroup paths (v1, v2 and hybrid hosts) as containers are told apart by, and systemd's unit-name
escaping."""

from __future__ import annotations

import re

from corepipe.platform import procfs

_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_DELETED = " (deleted)"


def candidate_paths(text: str) -> list:
    """The distinct cgroup paths of a process: the unified (v2) one, then name=systemd, then the v1 controllers.

    On a hybrid host the unified path may be "/" while the v1 hierarchies name the container,
    so every distinct path is a candidate; "/" and empty paths go last.
    """
    unified, named, legacy = [], [], []
    for hierarchy, controllers, path in procfs.cgroup_entries(text):
        if path.endswith(_DELETED):
            path = path[: -len(_DELETED)]
        if hierarchy == "0" and controllers == "":
            unified.append(path)
        elif controllers.startswith("name="):
            named.append(path)
        else:
            legacy.append(path)
    seen, result = set(), []
    for path in unified + named + legacy:
        if path not in seen:
            seen.add(path)
            result.append(path)
    result.sort(key=lambda p: p in ("/", ""))
    return result


def segments(path: str) -> list:
    return [s for s in path.split("/") if s]


def unescape(name: str) -> str:
    r"""systemd's unit-name escaping: ``\x2d`` is '-'."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def scope_id(segment: str, prefix: str, suffix: str = ".scope") -> str:
    """The text between ``prefix`` and ``suffix`` (suffix optional), or "" when the prefix does not match."""
    if not segment.startswith(prefix):
        return ""
    rest = segment[len(prefix):]
    return rest[: -len(suffix)] if suffix and rest.endswith(suffix) else rest
