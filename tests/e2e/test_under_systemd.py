"""The systemd units under a real systemd: a Debian tree booted with ``systemd-nspawn -b`` (tests/nspawn.py),
corepipe installed in it by install/install.sh, real crashes handed by the host's kernel to the socket
systemd holds inside.

How a crash inside the container reaches the server: the kernel takes a socket pattern only from the initial
mount namespace and resolves its path from the host's root. So the test writes ``@@<dir>/coredump.socket``
from the host (under KernelSettings), binds ``<dir>`` into the container at the same path, and a drop-in
points corepipe.socket there. A process crashing inside makes the kernel connect to the socket systemd
listens on; socket activation starts corepipe.service, whose server reads the crashed process in /proc (it
is in the container's PID namespace) and files it in the container's store.

What cannot run in the container, and why:
- the server's own pattern writes: no process inside is in the initial mount namespace (nor can join it:
  the host's PID 1 is outside the container's PID namespace), and /proc/sys is read-only there. The server
  reads back the pattern the test wrote and goes on; on stop it cannot put the pipe fallback back, so a
  crash during a restart waits in the socket's backlog here, where on a host the pipe handler takes it.
- the pipe handler: the kernel runs it in the host's root, never the container's installation.
- install.sh's ``corepipe install`` needs a writable /proc/sys: it runs in a mount namespace of its own with
  a fresh /proc, and writes no kernel setting because the test has set them to what it would write.

The unit names and paths this module expects are in UNITS, STORE and SANDBOX below. corepipe-ship.service is
checked from inside: as shipped, with its ExecStart pointed at a probe that tries to write outside the store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nspawn import REGISTRY_ENV, Container, debian_root
from support import (
    CORE_PATTERN,
    NO_RATE_LIMIT,
    PIPE_LIMIT,
    KernelSettings,
    dropped_dumps,
    kernel_log_now,
    need,
    need_root_kernel,
    need_tool,
    wait_for,
)

from corepipe.platform import coredump_socket

REPO = Path(__file__).resolve().parents[2]
#: The units install.sh installs in socket mode, by role, and what this module expects of them.
UNITS = {"socket": "corepipe.socket", "forward": "corepipe-forward.socket", "server": "corepipe.service",
         "timer": "corepipe-prune.timer", "prune": "corepipe-prune.service"}
STORE = "/var/lib/corepipe"
RUN_DIR = "/run/corepipe"
#: corepipe.service's sandboxing as systemd reports it (``systemctl show``; lists compared in any order).
SANDBOX = {"ProtectSystem": "strict", "ProtectHome": "read-only", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
           "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
           "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
           "ProtectKernelTunables": "no", "RestrictNamespaces": "ipc mnt net pid uts",
           "SystemCallArchitectures": "native",
           "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "IPAddressDeny": "::/0 0.0.0.0/0",
           "IPAddressAllow": "::1/128 127.0.0.0/8",
           "CapabilityBoundingSet": "cap_chown cap_dac_override cap_dac_read_search cap_fowner cap_kill cap_setgid "
                                    "cap_setuid cap_sys_chroot cap_sys_ptrace cap_sys_admin"}

pytestmark = pytest.mark.timeout(1500)  # the first run builds the Debian tree (3-4 minutes) and installs


@dataclass
class System:
    """The booted container with corepipe installed; ``shared`` is the host directory bound at the same path."""

    container: Container
    shared: Path

    @property
    def socket(self) -> str:
        return f"{self.shared}/coredump.socket"

    def records(self) -> list:
        store = self.container.path(STORE)
        return [json.loads(p.read_text()) for p in store.rglob("record.json")] if store.is_dir() else []

    def wait_record(self, pid: int, comm: str, timeout: float = 60.0) -> dict:
        def done() -> object:
            return next((r for r in self.records() if r.get("pid") == pid and r.get("comm") == comm
                         and r.get("status") != "collecting"), None)
        return wait_for(done, timeout, f"the record of pid {pid} ({comm}) in the container's store")

    def crash(self, comm: str) -> int:
        """A crasher run as a service of the container's systemd (core limit unlimited); its PID inside."""
        script = self.script("crash.sh", f'echo $$; exec {self.shared}/crasher 0 "$1"\n')
        proc = self.container.service(["sh", script, comm], properties=("LimitCORE=infinity",), check=False)
        assert proc.returncode != 0, proc
        return int(proc.stdout.split()[0])

    def script(self, name: str, text: str) -> str:
        """A shell script in the shared directory (systemd would expand the ``$`` of a command line)."""
        path = self.shared / name
        path.write_text(text)
        return str(path)

    def listening_inode(self) -> int:
        """The inode of the socket listening on self.socket (/proc/net/unix: the container shares the host's
        network namespace); 0 when none listens."""
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) == 8 and fields[7] == self.socket and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                return int(fields[6])
        return 0

    def server_pid(self) -> int:
        return int(self.container.show(UNITS["server"], "MainPID"))


def _copy_checkout(dest: Path) -> None:
    """The working tree, without what a build or the tests made (install.sh builds in it: the bind is ours)."""
    shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".servers", "*.egg-info", "__pycache__", ".pytest_cache", "build"))


def _registry_env() -> dict:
    return {k: v for k, v in os.environ.items() if REGISTRY_ENV.fullmatch(k)}


@pytest.fixture(scope="module")
def system(crasher: Path) -> Iterator[System]:
    need_root_kernel()
    modes = Path("/proc/sys/kernel/core_modes")
    need(modes.exists() and "socket" in modes.read_text().split(), "needs a kernel with coredump socket mode")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        need_tool(tool)
    root = debian_root()
    shared = Path(f"/run/cpt-{uuid.uuid4().hex[:8]}")  # never /run/corepipe: a real installation's
    shared.mkdir(mode=0o755)
    try:
        _copy_checkout(shared / "src")
        shutil.copy2(crasher, shared / "crasher")
        with KernelSettings() as settings:
            settings.undo_on_abort(["rm", "-rf", str(shared)])
            # What `corepipe install --mode socket` and the server would write, written from the host.
            settings.set(coredump_socket.pattern(f"{shared}/coredump.socket"), pipe_limit=256)
            container = Container(root, f"cpt-{shared.name[4:]}", [str(shared)], shared / "console.log")
            try:
                container.boot()
                settings.undo_on_abort(["kill", "-KILL", str(container.nspawn.pid), str(container.pid1)])
                system = System(container, shared)
                _install(system)
                yield system
            finally:
                container.stop()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _install(system: System) -> None:
    """install.sh as a person runs it, after the test's drop-in and config; the kernel is left as the test set it."""
    container = system.container
    # The kernel connects to this path in the host's root: the socket listens where the bind makes both one.
    # corepipe.socket's own path would have made /run/corepipe, which the server's sandbox needs.
    dropin = container.path(f"/etc/systemd/system/{UNITS['socket']}.d/test.conf")
    dropin.parent.mkdir(parents=True)
    dropin.write_text(f"[Socket]\nListenStream=\nListenStream={system.socket}\n"
                      f"ExecStartPre=/bin/mkdir -p -m 0700 {RUN_DIR}\n")
    # Metrics on any free port (the container shares the host's network), and crash loops not rate-limited.
    config = container.path("/etc/corepipe/config.toml")
    config.parent.mkdir(parents=True)
    config.write_text(f'metrics_listen = "127.0.0.1:0"\n{NO_RATE_LIMIT}')
    before = CORE_PATTERN.read_bytes(), PIPE_LIMIT.read_bytes()
    # A fresh /proc in a mount namespace of its own: /proc/sys is writable there, as on a host. --force: the
    # socket pattern the test wrote belongs to no installation yet.
    proc = container.service(["unshare", "--mount-proc", "--", "bash", f"{system.shared}/src/install/install.sh",
                              "--mode", "socket", "--socket", system.socket, "--force"], env=_registry_env(),
                             timeout=900, check=False)
    assert (CORE_PATTERN.read_bytes(), PIPE_LIMIT.read_bytes()) == before, "install.sh changed the kernel settings"
    assert proc.returncode == 0, f"install.sh failed in the container:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "selftest passed" in proc.stdout, proc.stdout


def test_install_sh_enables_the_units(system: System) -> None:
    """install.sh (socket mode) leaves the socket listening, the server running and the timer waiting; no
    unit failed, and its selftest's crash went through the socket (the fixture checks it passed)."""
    c = system.container
    for unit in (UNITS["socket"], UNITS["forward"], UNITS["server"], UNITS["timer"]):
        assert c.systemctl("is-enabled", unit) == "enabled", unit
        assert c.systemctl("is-active", unit) == "active", unit
    assert c.systemctl("list-units", "--failed", "--plain", "--no-legend", "corepipe*") == ""
    assert system.listening_inode() != 0


def test_a_crash_activates_the_stopped_server(system: System) -> None:
    """With corepipe.service stopped and the socket left listening, a crash's connection starts the server
    (socket activation), which collects that crash from systemd's socket."""
    c = system.container
    c.systemctl("stop", UNITS["server"])
    assert c.systemctl("is-active", UNITS["server"], check=False) == "inactive"
    inode = system.listening_inode()
    assert inode != 0 and c.systemctl("is-active", UNITS["socket"]) == "active"
    since = kernel_log_now()
    pid = system.crash("cptactivate")
    record = system.wait_record(pid, "cptactivate")
    assert record["status"] == "complete", record
    assert c.systemctl("is-active", UNITS["server"]) == "active"
    server = system.server_pid()
    # The started server listens on systemd's socket, not one of its own.
    fds = c.path(f"/proc/{server}/fd")
    assert f"socket:[{inode}]" in {os.readlink(fd) for fd in fds.iterdir()}
    assert dropped_dumps(since, {"cptactivate"}) == []


def test_a_restart_keeps_the_socket_and_loses_no_crash(system: System) -> None:
    """Crashes keep coming, every 30 ms, while ``systemctl restart corepipe.service`` runs and the new server
    starts: the listening socket is the same one throughout, and every crash gets a complete record."""
    c = system.container
    wait_for(lambda: (c.path(f"{RUN_DIR}/serve.json").exists() and system.server_pid()), 30, "a running server")
    inode, old = system.listening_inode(), system.server_pid()
    assert inode != 0
    log, stop = system.shared / "loop.log", system.shared / "loop.stop"
    since = kernel_log_now()
    loop = system.script("loop.sh", f'while [ ! -e {stop} ]; do {system.shared}/crasher 0 cptloop & '
                                    f'echo "$! $(date +%s.%N)" >> {log}; sleep 0.03; done; wait\n')
    c.run(["systemd-run", "-q", "--unit=cpt-crash-loop", "-p", "LimitCORE=infinity", "sh", loop])
    try:
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 5, 30, "the first crashes")
        began = time.time()
        c.systemctl("restart", UNITS["server"])
        new = int(wait_for(lambda: system.server_pid() != old and system.server_pid(), 30, "the new server"))
        wait_for(lambda: _health_pid(system) == new, 60, "the new server's health file")
        ready = time.time()
        time.sleep(1.0)
    finally:
        stop.touch()
    wait_for(lambda: c.systemctl("is-active", "cpt-crash-loop", check=False) != "active", 120, "the crash loop")
    launched = [(int(pid), float(when)) for pid, when in (line.split() for line in log.read_text().splitlines())]
    during = [pid for pid, when in launched if began <= when <= ready]
    assert len(during) >= 3, f"too few crashes during the restart to tell: {launched}, {began}-{ready}"
    for pid, _ in launched:
        assert system.wait_record(pid, "cptloop")["status"] == "complete"
    assert system.listening_inode() == inode
    assert dropped_dumps(since, {"cptloop"}) == []


def _health_pid(system: System) -> int:
    try:
        return int(json.loads(system.container.path(f"{RUN_DIR}/serve.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return 0


def test_the_servers_sandbox_is_in_force(system: System) -> None:
    """From the running server's own mount namespace: /etc, /usr and /root are read-only, the store and the
    run directory are writable, /tmp is its own; its process has no new privileges, a seccomp filter and
    only the unit's capabilities. systemd reports the unit's directives as set."""
    c = system.container
    c.systemctl("start", UNITS["server"])
    server = int(wait_for(system.server_pid, 30, "a running server"))

    def write(path: str) -> subprocess.CompletedProcess:
        return c.run(["nsenter", "-t", str(server), "-m", "--", "sh", "-c", f"echo x > {path} && rm {path}"],
                     check=False)
    for path in ("/etc/cpt-probe", "/usr/cpt-probe", "/usr/local/bin/cpt-probe", "/root/cpt-probe",
                 "/var/lib/cpt-probe"):
        denied = write(path)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied)
    for path in (f"{STORE}/cpt-probe", f"{RUN_DIR}/cpt-probe"):
        assert write(path).returncode == 0, path
    # PrivateTmp: a file the server's /tmp holds is not in the container's.
    c.run(["nsenter", "-t", str(server), "-m", "--", "touch", "/tmp/cpt-private"])
    assert not c.path("/tmp/cpt-private").exists()
    status = dict(line.split(":\t", 1) for line in c.path(f"/proc/{server}/status").read_text().splitlines()
                  if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert int(status["CapBnd"], 16) == _capability_mask(SANDBOX["CapabilityBoundingSet"].split())
    for key, value in SANDBOX.items():  # lists in any order (systemd keeps address lists as sets)
        assert sorted(c.show(UNITS["server"], key).split()) == sorted(value.split()), key


def _capability_mask(names: list) -> int:
    numbers = {"cap_chown": 0, "cap_dac_override": 1, "cap_dac_read_search": 2, "cap_fowner": 3, "cap_kill": 5,
               "cap_setgid": 6, "cap_setuid": 7, "cap_sys_chroot": 18, "cap_sys_ptrace": 19, "cap_sys_admin": 21}
    return sum(1 << numbers[name] for name in names)


def test_the_prune_timer_is_scheduled_and_its_service_runs(system: System) -> None:
    """corepipe-prune.timer has a next elapse and triggers corepipe-prune.service, which runs to success with
    the ExecStart install.sh wrote."""
    c = system.container
    line = c.systemctl("list-timers", "--all", "--no-legend", UNITS["timer"])
    assert UNITS["timer"] in line and UNITS["prune"] in line and not line.startswith("n/a"), line
    assert c.show(UNITS["timer"], "Triggers") == UNITS["prune"]
    # OnBootSec/OnUnitActiveSec: a monotonic elapse, shown as a time span ("1h 32min ...").
    assert c.show(UNITS["timer"], "NextElapseUSecMonotonic") not in ("", "0", "infinity")
    c.systemctl("start", UNITS["prune"])
    assert c.show(UNITS["prune"], "Result") == "success"
    assert c.show(UNITS["prune"], "ExecMainStatus") == "0"


def test_stopping_the_server_cannot_hand_the_kernel_back_here(system: System) -> None:
    """The documented limit of this harness, checked so it is noticed if it changes: the server in the container
    cannot write kernel.core_pattern (its stop logs that the pipe fallback could not be put back), so the
    pattern stays the socket's the test wrote."""
    c = system.container
    c.systemctl("start", UNITS["server"])
    wait_for(lambda: _health_pid(system) == system.server_pid() != 0, 60, "a running server")
    c.systemctl("stop", UNITS["server"])
    assert CORE_PATTERN.read_text().rstrip("\n") == coredump_socket.pattern(system.socket)
    journal = c.run(["journalctl", "-q", "--no-pager", "-u", UNITS["server"], "-n", "50"]).stdout
    assert "cannot put back kernel.core_pattern" in journal, journal


#: What corepipe-ship.service's process may write and hold, reported into the store (its one writable place).
SHIP_PROBE = """#!/bin/sh
out=/var/lib/corepipe/cpt-ship-probe
: > "$out.tmp" || exit 1
for p in /etc/cpt-probe /usr/cpt-probe /root/cpt-probe /var/lib/cpt-probe /var/cpt-probe /home/cpt-probe; do
    if echo x > "$p" 2>/dev/null; then echo "$p written" >> "$out.tmp"; rm -f "$p"
    else echo "$p refused" >> "$out.tmp"; fi
done
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status >> "$out.tmp"
mv "$out.tmp" "$out"
exec sleep infinity
"""


def test_the_shippers_sandbox_is_in_force(system: System) -> None:
    """corepipe-ship.service as shipped, its ExecStart pointed at a probe (as install.sh points it at the
    installation): from inside it, nothing but the store can be written, and its process has no capability,
    no new privileges and a seccomp filter."""
    c = system.container
    probe = system.script("ship-probe.sh", SHIP_PROBE)
    os.chmod(probe, 0o755)
    unit = (REPO / "install" / "systemd" / "corepipe-ship.service").read_text()
    unit = "\n".join(f"ExecStart={probe}" if line.startswith("ExecStart=") else
                     "EnvironmentFile=-/etc/corepipe/ship.env" if line.startswith("EnvironmentFile=") else line
                     for line in unit.splitlines())
    c.path("/etc/systemd/system/corepipe-ship.service").write_text(unit + "\n")
    c.systemctl("daemon-reload")
    c.systemctl("start", "corepipe-ship.service")
    try:
        report = wait_for(lambda: c.path(f"{STORE}/cpt-ship-probe").exists()
                          and c.path(f"{STORE}/cpt-ship-probe").read_text(), 60, "the ship probe's report")
    finally:
        c.systemctl("stop", "corepipe-ship.service", check=False)
    lines = dict((line.split(maxsplit=1) + [""])[:2] for line in report.splitlines())
    for path in ("/etc/cpt-probe", "/usr/cpt-probe", "/root/cpt-probe", "/var/lib/cpt-probe", "/var/cpt-probe",
                 "/home/cpt-probe"):
        assert lines[path] == "refused", report
    assert lines["CapEff:"].strip() == "0000000000000000" and lines["CapBnd:"].strip() == "0000000000000000", report
    assert lines["NoNewPrivs:"].strip() == "1" and lines["Seccomp:"].strip() == "2", report
