"""Crash storms through the real kernel: every crash is accounted for.

- 64 processes across (cgroup-only and real Docker) containers, all compressing at once: the store's
  accounting and rate limits add up under concurrency.
- 128 different executables, host processes and real Docker containers, at install's defaults
  (core_pipe_limit and the config's storm bounds), in pipe and socket mode: 128 records, none skipped.
- A crash beyond the storm bounds (platform/slots.py): recorded without a core, or without a
  postmortem, and the reason said.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
from cgroups import StandIns
from runtimes import unique
from support import (
    core_digest,
    dropped_dumps,
    installed_handler,
    kernel_log_now,
    mounted_tmpfs,
    need_tool,
    served_handler,
    start_crash,
    wait_for,
)

from corepipe.platform import slots, static_forwarder
from corepipe.platform.config import Config
from corepipe.platform.kernel import build_pattern
from corepipe.platform.store import Store
from corepipe.services import install

FAKE_CONTAINERS, PER_CONTAINER, DOCKER = 10, 6, 4
RATE = 5


def _wait_running(name: str, timeout: float = 120) -> int:
    """The host PID of container ``name``'s first process, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} {{.State.Pid}}", name],
                               capture_output=True, text=True).stdout.split()
        if state and state[0] == "true":
            return int(state[1])
        time.sleep(0.1)
    raise AssertionError(f"container {name} did not start")


#: Where a shell waits for its stdin: dash in read(2), busybox's ``read`` in poll(2).
WAITING_FOR_INPUT = ("pipe_read", "pipe_wait", "poll_schedule_timeout.constprop.0", "poll_schedule_timeout")


def _leaf(pid: int) -> int:
    """The innermost first child below ``pid`` (the shell that nsenter started inside a container)."""
    while True:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            return pid
        pid = int(children[0])


def _blocked_in_read(pids: list, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = 0
        for pid in pids:
            try:
                waiting += Path(f"/proc/{_leaf(pid)}/wchan").read_text().endswith(WAITING_FOR_INPUT)
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
    fakes = StandIns()
    ids = [fakes.new() for _ in range(FAKE_CONTAINERS)]
    names = [unique("6-storm") for _ in range(DOCKER)]
    read_end, write_end = os.pipe()
    procs = []
    # Every core compressing at once (no storm bound): the store's accounting is what is tested here.
    config = f"rate_limit_container = {RATE}\nrate_limit_exe = 0\ncompression_threads = 0\nconcurrent_cores = 0\n"
    if max_use:
        config += f"max_use = {max_use}\nkeep_free = 0\n"
    try:
        with contextlib.ExitStack() as stack:
            if max_use:
                stack.enter_context(mounted_tmpfs(handler_dir / "store", "64m"))
            handler = stack.enter_context(installed_handler(handler_dir, config, pipe_limit=install.PIPE_LIMIT))
            for c, cid in enumerate(ids):
                enter = fakes.join(cid)

                def preexec(enter=enter) -> None:
                    enter()
                    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                for i in range(PER_CONTAINER):
                    procs.append(subprocess.Popen(fakes.command(cid, ["/bin/sh", "-c", f'read x; exec "$0" 1 s{c}-{i}',
                                                                      str(crasher)]),
                                                  stdin=read_end, preexec_fn=preexec, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL))
            dockers = [subprocess.Popen(["docker", "run", "-i", "--name", name, "--network=none", "--ulimit",
                                         "core=-1", docker_image, "/bin/sh", "-c", f"read x; exec /crasher 1 d{n}"],
                                        stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                       for n, name in enumerate(names)]
            os.close(read_end)
            read_end = -1
            inits = [_wait_running(name) for name in names]
            _blocked_in_read([p.pid for p in procs] + inits)  # the docker shells reach their read too
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
        assert all(p.returncode == 0 for p in procs)  # the shell StandIns.command puts in between exits 0
        by_group: dict = {}
        for r in recs:
            by_group.setdefault(r["container"]["id"], []).append(r)
        for cid in ids:
            group = by_group[cid]
            assert len(group) == PER_CONTAINER
            assert sum(r["core"]["stored"] for r in group) == RATE, (
                "the rate limit's count went wrong",
                [(r["_dir"], r["core"].get("reason"), r["container"]) for r in group])
            limited = [r for r in group if not r["core"]["stored"]]
            assert all(r["core"]["reason"].startswith("rate limited") for r in limited)
        for n, name in enumerate(names):
            group = [r for r in recs if r["comm"] == f"d{n}"]
            assert len(group) == 1 and group[0]["container"]["name"] == name and group[0]["core"]["stored"]
        assert len([r for r in recs if r["core"]["stored"]]) == FAKE_CONTAINERS * RATE + DOCKER
        state = json.loads((handler.store / ".state.json").read_text())
        for cid in ids:
            assert len(state["rate"][f"container:runc/{cid}"]) == RATE
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
        fakes.remove()


STORM, STORM_DOCKER = 128, 16
def _final_records(handler: object, count: int, timeout: float) -> list:
    """The records once ``count`` are final (none left at ``collecting``); fails after ``timeout``."""
    def final() -> list:
        recs = [r for r in handler.records() if r.get("status") != "collecting"] if handler.store.exists() else []
        return recs if len(recs) >= count else []
    try:
        return wait_for(final, timeout, f"{count} final records")
    except AssertionError:
        recs = handler.records() if handler.store.exists() else []
        raise AssertionError(f"{len(recs)} records of {count} after {timeout} s, "
                             f"{sum(r.get('status') == 'collecting' for r in recs)} still collecting") from None


@pytest.mark.parametrize("mode", ["pipe", "socket", "forwarded", "forwarder"])
def test_storm_of_128_executables_at_install_defaults(handler_dir: Path, crasher: Path, docker_image: str,
                                                      mode: str) -> None:
    """128 different executables crash at once, 16 of them in real Docker containers, with the config's
    defaults and install's core_pipe_limit: 128 records, none dropped by the kernel, every core whole.
    ``forwarded``: pipe mode with ``corepipe serve`` running: the Python handlers hand the crashes over, each
    waits for a worker while the kernel holds it, and every core allowed by the rate limits is stored;
    ``forwarder``: the same through the static forwarder, install's pattern program where it builds."""
    zstd = need_tool("zstd")
    copies = handler_dir / "x"
    copies.mkdir(mode=0o755)
    exes = []
    for n in range(STORM):  # one executable each: the per-executable rate limit sees 128, not one
        exe = copies / f"c{n}"
        shutil.copy2(crasher, exe)
        exes.append(exe)
    names = [unique("6-storm128") for _ in range(STORM_DOCKER)]
    read_end, write_end = os.pipe()
    procs: list = []
    dockers: list = []
    serve = {"pipe": installed_handler, "socket": served_handler,
             "forwarded": functools.partial(served_handler, mode="pipe"),
             "forwarder": functools.partial(served_handler, mode="pipe")}[mode]
    try:
        with serve(handler_dir, pipe_limit=install.PIPE_LIMIT) as handler:
            if mode == "forwarder":
                need_tool("gcc")
                forwarder = handler_dir / "corepipe-forward"
                forwarder.write_bytes(static_forwarder.build(str(handler.forward_socket), str(handler.launcher)))
                forwarder.chmod(0o755)
                handler.settings.set(build_pattern(str(forwarder), str(handler.config)), pipe_limit=install.PIPE_LIMIT)
            started = kernel_log_now()
            for n in range(STORM_DOCKER):
                dockers.append(subprocess.Popen(
                    ["docker", "run", "-i", "--name", names[n], "--network=none", "--ulimit", "core=-1",
                     "-v", f"{exes[n]}:/c{n}:ro", docker_image, "/bin/sh", "-c", f"read x; exec /c{n} 0 d{n}"],
                    stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            for n in range(STORM_DOCKER, STORM):
                procs.append(start_crash(["/bin/sh", "-c", f'read x; exec "$0" 0 s{n}', str(exes[n])], stdin=read_end,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            os.close(read_end)
            read_end = -1
            inits = [_wait_running(name) for name in names]
            _blocked_in_read([p.pid for p in procs] + inits, timeout=120)
            os.close(write_end)  # every reader sees end-of-file at once
            write_end = -1
            for p in procs:
                assert p.wait(timeout=300) == -11
            for d in dockers:
                assert d.wait(timeout=300) == 139, d.stderr.read()
            # Every crasher is reaped, so the kernel has logged any dump it dropped.
            comms = {f"d{n}" for n in range(STORM_DOCKER)} | {f"s{n}" for n in range(STORM_DOCKER, STORM)}
            assert not dropped_dumps(started, comms), dropped_dumps(started, comms)[:3]
            recs = _final_records(handler, STORM, 300)
            if mode in ("forwarded", "forwarder"):  # each crash handed over at its first try: none refused (a
                # refused C forwarder runs the Python handler, which hands it over again)
                counted = wait_for(lambda: (stats := handler.health()["stats"])["forwarded"] == STORM and stats, 30,
                                   "the server's counts")
                assert counted["forward_refused"] == 0, counted
        assert len(recs) == STORM and {r["comm"] for r in recs} == comms
        assert all(r["status"] == "complete" for r in recs), [r["collector"]["errors"] for r in recs
                                                              if r["status"] != "complete"]
        for r in recs:
            if r["comm"].startswith("d"):
                name = names[int(r["comm"][1:])]
                assert (r["container"]["runtime"], r["container"]["name"]) == ("docker", name), r["container"]
            else:
                assert r["container"]["runtime"] == "host", r["container"]
            core = Path(r["_dir"]) / "core.zst"
            assert core.exists() == r["core"]["stored"], r["core"]
            if r["core"]["stored"]:
                data = subprocess.run([zstd, "-q", "-d", "-c", str(core)], capture_output=True, check=True).stdout
                assert core_digest(data) == r["core"]["digest"]
            else:  # the defaults keep 10 host cores per 10 minutes; a storm beyond its bound says so
                assert r["core"]["reason"].startswith(("rate limited", "storm: ", "deleted: ",
                                                       "the collector was saturated")), r["core"]
        assert all(r["core"]["stored"] for r in recs if r["comm"].startswith("d") and
                   not r["core"]["reason"]), "a container's core is missing without a reason"
        if mode in ("forwarded", "forwarder"):
            assert {r["collector"]["transport"] for r in recs} == {"forwarded"}
            assert not [r["core"]["reason"] for r in recs if r["core"]["reason"] and
                        not r["core"]["reason"].startswith("rate limited")], "only the rate limits refuse a core"
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        for p in procs + dockers:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)


def _hold_all(store: Path, kind: str, config: Config) -> list:
    """Every slot of ``kind`` held by this test (the handler's config waits for none)."""
    with Store(str(store)) as opened:
        turns = [getattr(slots, f"{kind}_turn")(opened, config) for _ in range(slots.count(-1))]
        assert all(t.fd is not None for t in turns), [t.refused for t in turns]
    return turns


def test_a_crash_beyond_the_storm_bounds_is_recorded_with_the_reason(handler_dir: Path, crasher: Path) -> None:
    """With every core slot taken (by this test, as a storm would), a crash is recorded without a core and
    the kernel is let go; with every postmortem slot taken, its core is stored and the record says
    the binaries and backtrace were skipped. Once the slots are free, the next crash gets both."""
    config = "core_wait = 0\npostmortem_wait = 0\nrate_limit_exe = 0\nbinaries_host = true\n"
    with installed_handler(handler_dir, config, pipe_limit=install.PIPE_LIMIT) as handler:
        handler.store.mkdir(mode=0o700)
        cfg = Config(store=str(handler.store), core_wait=0, postmortem_wait=0)
        held = _hold_all(handler.store, "core", cfg)
        try:
            assert start_crash([str(crasher), "64", "storm-core"]).wait(timeout=120) == -11
            rec = handler.wait_record(lambda r: r["comm"] == "storm-core", timeout=60)
            assert not rec["core"]["stored"] and rec["status"] == "complete"
            assert rec["core"]["reason"].startswith(f"storm: {slots.count(-1)} handlers busy storing cores"), rec
            assert "postmortem" not in rec and not rec.get("binaries") and not rec.get("backtrace")
        finally:
            for turn in held:
                turn.close()
        held = _hold_all(handler.store, "postmortem", cfg)
        try:
            assert start_crash([str(crasher), "0", "storm-post"]).wait(timeout=120) == -11
            rec = handler.wait_record(lambda r: r["comm"] == "storm-post", timeout=60)
            assert rec["core"]["stored"] and rec["status"] == "complete", rec["core"]
            assert rec["postmortem"]["skipped"].startswith(
                f"storm: {slots.count(-1)} handlers busy saving binaries and backtraces"), rec["postmortem"]
            assert not rec.get("binaries") and not rec.get("backtrace")
        finally:
            for turn in held:
                turn.close()
        assert start_crash([str(crasher), "0", "storm-after"]).wait(timeout=120) == -11
        rec = handler.wait_record(lambda r: r["comm"] == "storm-after", timeout=120)
        assert rec["core"]["stored"] and "postmortem" not in rec
        assert rec["binaries"]["files"], rec.get("binaries")
