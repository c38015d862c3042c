"""The collect pipeline driven in-process (collect.collect), as a second entry point drives it: its own
core fd (a pipe fed from a thread) and KernelArgs built without the kernel's argv."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from corepipe.platform import capture
from corepipe.platform.config import Config
from corepipe.platform.kernel import RLIM_INFINITY, KernelArgs
from corepipe.services import collect


def _feed(fd: int, data: bytes) -> threading.Thread:
    """Write ``data`` to the pipe ``fd`` from a thread (it may be bigger than a pipe holds), then close it."""
    def write() -> None:
        with open(fd, "wb") as f:
            f.write(data)
    thread = threading.Thread(target=write)
    thread.start()
    return thread


def collect_in_process(cfg: Config, pid: int, comm: str, core: bytes, when: int = 1700000000) -> tuple:
    """(exit code, what the core fd is after the pipeline let go of it, the crash's record) for a crash of
    the live process ``pid`` whose core is ``core``, dumped at ``when`` (the kernel's %t)."""
    pidfd = os.pidfd_open(pid)
    read, write = os.pipe()
    feeder = _feed(write, core)
    try:
        # What a server knows from SO_PEERCRED / its peer's pidfd, as KernelArgs.
        args = KernelArgs(pid=pid, ns_pid=pid, tid=pid, uid=os.getuid(), gid=os.getgid(), signal=11,
                          time=when, core_limit=RLIM_INFINITY, dump_mode=1, pidfd=pidfd, hostname="box",
                          comm=comm)
        early = capture.take_process(pid, pidfd, read)
        code = collect.collect(args, early, core_fd=read, cfg=cfg)
        feeder.join(30)
        released = os.readlink(f"/proc/self/fd/{read}")
    finally:
        os.close(read)
        os.close(pidfd)
    [rec] = [json.loads(p.read_text()) | {"_dir": p.parent} for p in Path(cfg.store).rglob("record.json")
             if json.loads(p.read_text()).get("comm") == comm]
    return code, released, rec
