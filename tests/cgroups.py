"""Cgroups for crash tests without a container runtime.

``FakeContainers``: plain cgroup directories that merely look like containers
(``.../docker-<64 hex>.scope``) with no runtime state behind them: forgeries, which corepipe must
not believe (they are filed under the crashing uid). ``StandIns``: containers made the way a
runtime makes one, so corepipe confirms them: a cgroup, an init in new PID and mount namespaces
placed in it, and runc's ``/run/runc/<id>/state.json`` recording that init; crashes run inside
its namespaces (``nsenter``). Enough to file crashes under several confirmed containers (the
storage policy's tests); real runtimes are tested elsewhere. Created under the v1 ``pids``
hierarchy (or cgroup2 where that is all there is) below a unique parent, and removed by ``remove()``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from support import AbortGuard, need

ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
HIERARCHIES = Path("/sys/fs/cgroup")


def remove_everywhere(parent: str) -> None:
    """Remove the cgroup ``parent`` (a unique path of the test's own) and all below it, in every hierarchy: a
    runtime removes a container's own cgroup but leaves the parents it made (in each v1 hierarchy, and cgroup2)."""
    for top in (HIERARCHIES, *HIERARCHIES.iterdir()):
        base = top / parent.strip("/")
        if base.is_dir():
            for directory in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                    reverse=True):
                directory.rmdir()
            base.rmdir()


class FakeContainers:
    def __init__(self) -> None:
        root = next((r for r in ROOTS if (r / "cgroup.procs").exists() and os.access(r, os.W_OK)), None)
        need(root is not None, "needs a writable cgroup hierarchy (root)")
        self.parent = root / f"corepipe-test-{uuid.uuid4().hex[:8]}"
        self.parent.mkdir()
        self.made: list = []
        self.guard = AbortGuard()  # the cgroups go even if the test process is killed
        self.guard.undo_on_abort(["find", str(self.parent), "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])

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
        self.guard.close()


class StandIns:
    RUNC_STATE = Path("/run/runc")

    def __init__(self) -> None:
        self.cgroups = FakeContainers()
        self.inits: dict = {}

    def new(self) -> str:
        """A new container id: its cgroup is <parent>/runc-<id>.scope, its init runs there, runc's state names it."""
        import subprocess

        cid = uuid.uuid4().hex + uuid.uuid4().hex
        directory = self.cgroups.parent / f"runc-{cid}.scope"
        directory.mkdir()
        self.cgroups.made.append(directory)
        unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sleep", "3600"],
                                   preexec_fn=FakeContainers.join_dir(directory), stdin=subprocess.DEVNULL)
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        while not children.read_text().split():
            if unshare.poll() is not None:
                raise RuntimeError(f"unshare exited ({unshare.returncode}) before its init started")
            time.sleep(0.01)
        init = children.read_text().split()
        self.inits[cid] = (unshare, int(init[0]))
        # Newest first, should the test process die: the forged runc state, then the container's processes.
        self.cgroups.guard.undo_on_abort(["sh", "-c", f"kill -9 {init[0]}; sleep 0.5"])
        self.cgroups.guard.undo_on_abort(["rm", "-rf", str(self.RUNC_STATE / cid)])
        (self.RUNC_STATE / cid).mkdir(parents=True)
        (self.RUNC_STATE / cid / "state.json").write_text(json.dumps({"id": cid, "init_process_pid": int(init[0])}))
        return cid

    def join(self, cid: str):
        return FakeContainers.join_dir(self.cgroups.parent / f"runc-{cid}.scope")

    def command(self, cid: str, argv: list) -> list:
        """``argv`` run inside the container's PID and mount namespaces. A shell in between exits normally:
        nsenter re-raises its child's fatal signal, which would make a second crash (of nsenter)."""
        return ["nsenter", "-t", str(self.inits[cid][1]), "-p", "-m", "--", "/bin/sh", "-c", '"$@"; exit 0', "sh",
                *argv]

    def remove(self) -> None:
        import shutil

        for cid, (unshare, init) in self.inits.items():
            try:
                os.kill(init, 9)  # the namespace's init: every process in it goes too
            except ProcessLookupError:
                pass
            unshare.wait(30)
            shutil.rmtree(self.RUNC_STATE / cid, ignore_errors=True)
        self.cgroups.remove()


def crash_in(containers, cid: str, argv: list, **kwargs):
    """support.crash() inside a FakeContainers or StandIns container (``cid``: an id from new(), or a cgroup
    directory of FakeContainers)."""
    import resource
    import subprocess

    from support import set_core_limit

    enter = containers.join_dir(cid) if isinstance(cid, Path) else containers.join(cid)
    if isinstance(containers, StandIns):
        argv = containers.command(cid, argv)
    limit = set_core_limit(kwargs.pop("core_limit", resource.RLIM_INFINITY))

    def preexec() -> None:
        enter()
        limit()
    return subprocess.run(argv, preexec_fn=preexec, capture_output=True, timeout=120, **kwargs)
