"""Reading /proc/<pid>/cgroup on v1, v2 and hybrid hosts."""

from __future__ import annotations


def candidate_paths(text: str) -> list:
    """The distinct cgroup paths of a process, the unified (v2) one first, then v1 by hierarchy."""
    unified, legacy = [], []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, _controllers, path = parts
        (unified if hierarchy == "0" else legacy).append(path)
    seen, result = set(), []
    for path in unified + legacy:
        if path not in seen:
            seen.add(path)
            result.append(path)
    # A v2 path of "/" on a hybrid host says nothing; prefer any more specific v1 path.
    result.sort(key=lambda p: p in ("/", ""))
    return result


def segments(path: str) -> list:
    return [s for s in path.split("/") if s]
