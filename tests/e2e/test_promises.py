"""Promises the docs make about collection, each checked through the real kernel.

- The crashed process is let go before the slow work: with every postmortem slot held by the test, the
  crash is reaped while its collector still waits for a slot, and the binaries and backtrace come after.
- ``ulimit -c 0`` still records the crash, and keeps the core only with ``honour_core_limit = false``;
  ``extract`` refuses to write a core to a terminal.
- A hung identity source (an LXC monitor that accepts and never answers) costs at most ``timeout``: the
  crash is reaped within the bound and recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    NO_RATE_LIMIT,
    crash,
    holding_slots,
    installed_handler,
    need,
    served_handler,
    short_tempdir,
    start_crash,
    wait_for,
)

from corepipe.domain.containers import lxc
from corepipe.platform import slots
from corepipe.platform.store import FAILED

MODES = {"pipe": installed_handler, "socket": served_handler}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tempdir()
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _collector_alive(h, crash_id_dir: Path) -> bool:
    """The crash's collector is still at work: its record is not final yet."""
    import json

    return json.loads((crash_id_dir / "record.json").read_text())["status"] == "collecting"


@pytest.mark.parametrize("mode", MODES)
def test_the_crash_is_reaped_before_binaries_backtrace_and_notify(mode: str, workdir: Path, crasher: Path) -> None:
    config = (f"{NO_RATE_LIMIT}concurrent_postmortems = 1\npostmortem_wait = 120\nbinaries_host = true\n"
              'notify_command = ["/bin/true"]\n')
    with MODES[mode](workdir, config_extra=config) as h:
        start_crash([str(crasher), "0", "warmup"]).wait(120)  # makes the store and its slot files
        warm = h.wait_record(lambda r: r["comm"] == "warmup", 60)
        assert warm["backtrace"].get("frames"), warm["backtrace"]
        if mode == "pipe":
            h.wait_idle()
        else:  # the worker lets go of its postmortem slot after the final record
            time.sleep(0.5)
        with holding_slots(h.store, slots.POSTMORTEM, 1):
            proc = start_crash([str(crasher), "16", "held"])  # over the 4 MiB read before the config
            proc.wait(60)  # the kernel let it go: reaped while the postmortem slot is still ours
            crash_dir = wait_for(lambda: next((Path(r["_dir"]) for r in h.records() if r["comm"] == "held"), None),
                                 30, "the held crash's first record")
            core = crash_dir / "core.zst"
            wait_for(core.exists, 30, "the committed core")
            time.sleep(1.0)  # the collector stays blocked on the slot, with the process long gone
            assert _collector_alive(h, crash_dir), "the record became final while every postmortem slot was held"
            assert not (crash_dir / "binaries").exists() or not any((crash_dir / "binaries").iterdir())
        rec = h.wait_record(lambda r: r["comm"] == "held", 120)
    assert rec["status"] == "complete", rec["collector"].get("errors")
    assert rec["core"]["stored"], rec["core"]
    assert rec["backtrace"].get("frames"), rec["backtrace"]
    assert rec["binaries"]["files"], rec["binaries"]


# A hung identity source --------------------------------------------------------------------------------

@contextlib.contextmanager
def hung_lxc_monitor(name: str) -> Iterator[list]:
    """A root-owned LXC command socket for container ``name`` that accepts and never answers, and the
    container's directory under /var/lib/lxc (what makes corepipe ask the monitor). Yields the connections
    accepted so far."""
    need(os.geteuid() == 0, "needs root for a system LXC container's directory")
    directory = Path("/var/lib/lxc") / name
    directory.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    accepted: list = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])  # accepted, never answered

    try:
        listener.bind(lxc.command_socket("/var/lib/lxc", name))
        listener.listen(16)
        threading.Thread(target=accept, daemon=True).start()
        yield accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in accepted:
            conn.close()
        directory.rmdir()


@pytest.mark.parametrize("timeout", [5, 1], ids=["state-budget", "handler-timeout"])
def test_a_hung_identity_source_costs_at_most_the_timeout(timeout: int, workdir: Path, crasher: Path) -> None:
    """With ``timeout`` 5 the identity's own budget (2 s) runs out first: the crash is filed under the LXC
    container, unconfirmed, with its core. With ``timeout`` 1 the handler's alarm comes first, before the first
    record: the crash is still filed (in store.FAILED, without its core) and the record says why."""
    from cgroups import FakeContainers

    name = f"cp-hung-{os.getpid()}"
    fakes = FakeContainers()
    try:
        group = fakes.parent / f"lxc.payload.{name}"
        group.mkdir()
        with hung_lxc_monitor(name) as accepted, \
                installed_handler(workdir, config_extra=f"{NO_RATE_LIMIT}timeout = {timeout}\n") as h:
            started = time.monotonic()
            proc = subprocess.Popen([str(crasher), "0", "hung"], preexec_fn=_join_and_unlimit(group))
            proc.wait(60)
            reaped = time.monotonic() - started
            rec = h.wait_record(lambda r: r["comm"] == "hung", 60)
            assert accepted, "corepipe never asked the (hung) monitor: the test does not test the bound"
        assert reaped < timeout + 2, f"reaped after {reaped:.1f} s with timeout = {timeout}"
        container = rec["container"]
        if timeout == 5:
            assert container["runtime"] == "lxc" and container["name"] == name, container
            assert container["confidence"] != "certain", container
            assert rec["core"]["stored"], rec["core"]
            assert "time" in json.dumps(container), container
        else:
            assert rec["status"] == "failed" and Path(rec["_dir"]).relative_to(h.store).parts[0] == FAILED
            assert not rec["core"]["stored"] and "time limit" in rec["core"]["reason"], rec["core"]
            assert any("time limit" in e for e in rec["collector"]["errors"]), rec["collector"]
    finally:
        fakes.remove()


def _join_and_unlimit(group: Path):
    import resource

    def apply() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return apply


# RLIMIT_CORE and honour_core_limit ---------------------------------------------------------------------

@pytest.mark.parametrize("honour", [True, False])
def test_rlimit_core_zero_keeps_the_core_only_when_not_honoured(honour: bool, workdir: Path, crasher: Path) -> None:
    """With ``ulimit -c 0`` the kernel still runs the handler (``%c`` = 0): the crash is always recorded, and its
    core kept only with ``honour_core_limit = false``."""
    config = f"{NO_RATE_LIMIT}honour_core_limit = {'true' if honour else 'false'}\n"
    with installed_handler(workdir, config_extra=config) as h:
        crash([str(crasher), "0", "limit0"], core_limit=0)
        rec = h.wait_record(lambda r: r["comm"] == "limit0", 60)
    assert rec["core_limit"] == 0, rec["core_limit"]
    assert rec["status"] == "complete", rec["collector"].get("errors")
    if honour:
        assert not rec["core"]["stored"] and rec["core"]["reason"] == "RLIMIT_CORE is 0", rec["core"]
        assert not (Path(rec["_dir"]) / "core.zst").exists()
    else:
        assert rec["core"]["stored"] and rec["core"]["complete"], rec["core"]
        assert (Path(rec["_dir"]) / "core.zst").stat().st_size == rec["core"]["compressed_size"]


# extract to a terminal ----------------------------------------------------------------------------------

def test_extract_refuses_a_terminal(workdir: Path, crasher: Path) -> None:
    """``extract`` with stdout a terminal (no ``-o``) refuses in one line rather than write a core to it."""
    import pty

    with installed_handler(workdir, config_extra=NO_RATE_LIMIT) as h:
        crash([str(crasher), "0", "toterm"])
        rec = h.wait_record(lambda r: r["comm"] == "toterm", 60)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(h.config), "extract", rec["id"]],
                              stdout=terminal, stderr=subprocess.PIPE, text=True, timeout=120)
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 1 << 16):
                shown += chunk
    finally:
        os.close(controller)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "terminal" in proc.stderr and "-o" in proc.stderr, proc.stderr
    assert b"ELF" not in shown and len(shown) < 1024, shown[:200]
