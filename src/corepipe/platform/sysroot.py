"""A throw-away gdb sysroot: symlinks at the crashed process's own paths to the files it ran.

The paths come from the crashed process (its maps), so each is checked to stay inside the
sysroot: absolute, no '.', '..' or empty components, no NUL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Optional

DELETED = " (deleted)"


def relative(path: str) -> Optional[str]:
    """``path`` as a safe relative path below a sysroot, or None."""
    if path.endswith(DELETED):
        path = path[: -len(DELETED)]
    parts = path.split("/")
    if not path.startswith("/") or "\0" in path or any(p in ("", ".", "..") for p in parts[1:]):
        return None
    return "/".join(parts[1:])


def build(root: str, links: Iterable[tuple], dir_mode: int = 0o700) -> dict:
    """Create ``root/<path>`` -> ``target`` for each (path, target); returns {path: link} of those made."""
    made = {}
    for path, target in links:
        rel = relative(path)
        if rel is None or path in made:
            continue
        link = os.path.join(root, rel)
        parent = os.path.dirname(link)
        try:
            os.makedirs(parent, mode=dir_mode, exist_ok=True)
            os.symlink(target, link)
        except OSError:
            continue  # a path that is also a directory of another path: keep the first
        made[path] = link
    for directory, _dirs, _files in os.walk(root):
        os.chmod(directory, dir_mode)  # makedirs' mode is cut by the umask
    return made
