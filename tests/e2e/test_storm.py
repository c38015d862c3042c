"""64 processes crashing at the same moment across containers: every one is accounted for."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
from cgroups import FakeContainers
from runtimes import unique
from support import core_digest, installed_handler, mounted_tmpfs, need_tool

FAKE_CONTAINERS, PER_CONTAINER, DOCKER = 10, 6, 4
RATE = 5


def _wait_running(name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True,
                               text=True).stdout.strip()
        if state == "true":
            return
        time.sleep(0.1)
    raise AssertionError(f"container {name} did not start")


def _blocked_in_read(pids: list, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = 0
        for pid in pids:
            try:
                waiting += Path(f"/proc/{pid}/wchan").read_text() .endswith(("pipe_read", "pipe_wait"))
            except OSError:
                pass
        if waiting == len(pids):
            return
        time.sleep(0.05)
    raise AssertionError("the crashers did not all reach their read")


def _check_store(store: Path, recs: list, zstd: str) -> None:
    """Every record final; every stored core whole and matching; no core without a stored record."""
    assert len(recs) == FAKE_CONTAINERS * PER_CONTAINER + DOCKER, f"{len(recs)} records"
    assert all(r["status"] == "complete" for r in recs), [r["core"]["reason"] for r in recs
                                                          if r["status"] != "complete"]
    for r in recs:
        core = Path(r["_dir"]) / "core.zst"
        assert core.exists() == r["core"]["stored"], r["core"]
        if r["core"]["stored"]:
            data = subprocess.run([zstd, "-q", "-d", "-c", str(core)], capture_output=True, check=True).stdout
            assert core_digest(data) == r["core"]["digest"] and len(data) == r["core"]["size"]
    assert not list(store.rglob(".*.tmp")), "temporary files left behind"
    assert json.loads((store / ".state.json").read_text())["reservations"] == {}


def _check_tight(store: Path, recs: list, max_use: int) -> None:
    used = sum(p.stat().st_blocks * 512 for p in store.rglob("core.zst"))
    assert used <= max_use, f"{used} bytes of cores over max_use {max_use}"
    reasons = [r["core"]["reason"] or "" for r in recs if not r["core"]["stored"]]
    assert any(reason.startswith("deleted: the store is over max_use") for reason in reasons), reasons
    assert all(reason.startswith(("deleted: ", "no room for the core", "rate limited")) for reason in reasons)
    assert sum(r["core"]["stored"] for r in recs) >= 4


@pytest.mark.parametrize("max_use", [None, 6 << 20], ids=["room", "tight"])
def test_64_simultaneous_crashes_across_containers(handler_dir: Path, crasher: Path, docker_image: str,
                                                   max_use: Optional[int]) -> None:
    """With room for all, every core the rate limit allows is stored; with a tight max_use, cores are
    deleted and refused concurrently and the store still adds up."""
    zstd = need_tool("zstd")
    fakes = FakeContainers()
    ids = [fakes.new() for _ in range(FAKE_CONTAINERS)]
    names = [unique("6-storm") for _ in range(DOCKER)]
    read_end, write_end = os.pipe()
    procs = []
    config = f"rate_limit_container = {RATE}\nrate_limit_exe = 0\ncompression_threads = 0\n"
    if max_use:
        config += f"max_use = {max_use}\nkeep_free = 0\n"
    try:
        with contextlib.ExitStack() as stack:
            if max_use:
                stack.enter_context(mounted_tmpfs(handler_dir / "store", "64m"))
            handler = stack.enter_context(installed_handler(handler_dir, config, pipe_limit=128))
            for c, cid in enumerate(ids):
                enter = fakes.join(cid)

                def preexec(enter=enter) -> None:
                    enter()
                    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                for i in range(PER_CONTAINER):
                    procs.append(subprocess.Popen(["/bin/sh", "-c", f'read x; exec "$0" 1 s{c}-{i}', str(crasher)],
                                                  stdin=read_end, preexec_fn=preexec, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL))
            dockers = [subprocess.Popen(["docker", "run", "-i", "--name", name, "--network=none", "--ulimit",
                                         "core=-1", docker_image, "/bin/sh", "-c", f"read x; exec /crasher 1 d{n}"],
                                        stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                       for n, name in enumerate(names)]
            os.close(read_end)
            read_end = -1
            for name in names:
                _wait_running(name)
            _blocked_in_read([p.pid for p in procs])
            time.sleep(0.5)  # the docker shells reach their read too
            os.close(write_end)  # every reader sees end-of-file at once
            write_end = -1
            for p in procs:
                p.wait(timeout=120)
            for d in dockers:
                d.wait(timeout=120)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                recs = handler.records()
                if len(recs) >= FAKE_CONTAINERS * PER_CONTAINER + DOCKER and all(
                        r["status"] != "collecting" for r in recs):
                    break
                time.sleep(0.2)
            recs = handler.records()
            _check_store(handler.store, recs, zstd)
            if max_use:
                _check_tight(handler.store, recs, max_use)
                return
        assert all(p.returncode == -11 for p in procs)
        by_group: dict = {}
        for r in recs:
            by_group.setdefault(r["container"]["id"], []).append(r)
        for cid in ids:
            group = by_group[cid]
            assert len(group) == PER_CONTAINER
            assert sum(r["core"]["stored"] for r in group) == RATE, "the rate limit's count went wrong"
            limited = [r for r in group if not r["core"]["stored"]]
            assert all(r["core"]["reason"].startswith("rate limited") for r in limited)
        for n, name in enumerate(names):
            group = [r for r in recs if r["comm"] == f"d{n}"]
            assert len(group) == 1 and group[0]["container"]["name"] == name and group[0]["core"]["stored"]
        assert len([r for r in recs if r["core"]["stored"]]) == FAKE_CONTAINERS * RATE + DOCKER
        state = json.loads((handler.store / ".state.json").read_text())
        for cid in ids:
            assert len(state["rate"][f"container:docker/{cid}"]) == RATE
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
        fakes.remove()
