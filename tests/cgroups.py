"""Plain cgroup directories that look like containers to corepipe (``.../docker-<64 hex>.scope``).

Enough to file crashes under several "containers" without a runtime; real containers are
tested elsewhere. Created under the v1 ``pids`` hierarchy (or cgroup2 where that is all
there is) below a unique parent, and removed by ``remove()``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from support import need

ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


class FakeContainers:
    def __init__(self) -> None:
        root = next((r for r in ROOTS if (r / "cgroup.procs").exists() and os.access(r, os.W_OK)), None)
        need(root is not None, "needs a writable cgroup hierarchy (root)")
        self.parent = root / f"corepipe-test-{uuid.uuid4().hex[:8]}"
        self.parent.mkdir()
        self.made: list = []

    def new(self, path: str = "") -> str:
        """A new container id; its cgroup is <parent>/<path>/docker-<id>.scope."""
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        directory = self.parent / path / f"docker-{cid}.scope"
        directory.mkdir(parents=True)
        self.made.append(directory)
        return cid

    def path(self, cid: str) -> Path:
        return next(d for d in self.made if d.name == f"docker-{cid}.scope")

    def join(self, cid: str):
        """A preexec_fn that moves the child into the container's cgroup."""
        return self.join_dir(self.path(cid))

    @staticmethod
    def join_dir(directory: Path):
        """A preexec_fn that moves the child into the cgroup ``directory``."""
        procs = directory / "cgroup.procs"

        def enter() -> None:
            procs.write_text(str(os.getpid()))
        return enter

    def remove(self) -> None:
        for directory in sorted(self.parent.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir():
                try:
                    directory.rmdir()
                except OSError:
                    pass
        try:
            self.parent.rmdir()
        except OSError:
            pass


def crash_in(containers: FakeContainers, cid: str, argv: list, **kwargs):
    """support.crash() inside a fake container (``cid``: an id from new(), or a cgroup directory)."""
    import resource
    import subprocess

    from support import set_core_limit

    enter = containers.join_dir(cid) if isinstance(cid, Path) else containers.join(cid)
    limit = set_core_limit(kwargs.pop("core_limit", resource.RLIM_INFINITY))

    def preexec() -> None:
        enter()
        limit()
    return subprocess.run(argv, preexec_fn=preexec, capture_output=True, timeout=120, **kwargs)
