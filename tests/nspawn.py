"""Real systemd for the tests: a Debian tree made with debootstrap (cached once per machine) booted with
``systemd-nspawn -b``, on hosts whose PID 1 is not systemd (tests/e2e/test_under_systemd.py).

The host has no systemd, so nspawn runs unregistered (``--register=no --keep-unit``) and commands reach the
container with ``nsenter`` into its PID 1. The tree is mounted read-only under a throwaway overlay
(``--volatile=overlay``): every boot starts from the same clean tree and leaves it untouched.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from support import wait_for

CACHE = Path(os.environ.get("COREPIPE_TEST_CACHE", "/var/cache/corepipe-tests"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,procps"
#: The host's settings for reaching the package registries, passed to commands run inside (pip in install.sh).
REGISTRY_ENV = re.compile(r"(PIP_[A-Z_]+|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY|REQUESTS_CA_BUNDLE|SSL_CERT_FILE)")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def debian_root() -> Path:
    """The cached Debian tree (built on first use: 3-4 minutes and about 300 MB), rebuilt when PACKAGES change.
    A lock keeps two sessions from building it at once; a half-built tree is never used."""
    CACHE.mkdir(parents=True, exist_ok=True)
    root, stamp = CACHE / "debian-root", CACHE / "debian-root.done"
    wanted = f"{SUITE} {MIRROR} {PACKAGES}\n"
    with open(CACHE / "debian-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == wanted and root.is_dir():
            return root
        stamp.unlink(missing_ok=True)
        building = CACHE / "debian-root.building"
        for old in (building, root):
            if old.exists():
                shutil.rmtree(old)
        made = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(building),
                               MIRROR], timeout=1500, capture_output=True, text=True)
        assert made.returncode == 0, f"debootstrap failed: {made.stdout[-2000:]}{made.stderr[-2000:]}"
        building.rename(root)
        stamp.write_text(wanted)
    return root


class Container:
    """A booted systemd-nspawn container of ``root``; ``binds`` are host paths bound at the same path inside."""

    def __init__(self, root: Path, name: str, binds: list, log: Path):
        self.root, self.name, self.binds, self.log = root, name, binds, log
        self.nspawn: Optional[subprocess.Popen] = None
        self.pid1 = 0

    def boot(self, timeout: float = 120.0) -> None:
        argv = ["systemd-nspawn", "-q", "-b", "-D", str(self.root), "--volatile=overlay", "--register=no",
                "--keep-unit", "--console=read-only", "-M", self.name, *(f"--bind={b}" for b in self.binds)]
        if os.path.exists(CA_BUNDLE):  # trust what the host trusts (a registry behind an intercepting proxy)
            argv.append(f"--bind-ro={CA_BUNDLE}")
        self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log.open("wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.pid1 = int(wait_for(self._child, 60, "the container's PID 1"))
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline and self.nspawn.poll() is None:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise AssertionError(f"the container did not boot (state {state!r}); its console: {self.log}")

    def _child(self) -> Optional[int]:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.log.read_text()[-2000:]}")
        try:  # nspawn forks a short-lived helper first: the container's PID 1 is the child running systemd
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
            return next((int(c) for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "systemd"), None)
        except OSError:
            return None

    def run(self, argv: list, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``argv`` inside the container: in all its namespaces, with a clean environment."""
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i", f"PATH={PATH}",
                               "LANG=C.UTF-8", *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc

    def service(self, argv: list, env: Optional[dict] = None, properties: tuple = (), check: bool = True,
                timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``argv`` as a transient service of the container's systemd (a process of the container, in its
        cgroups, as a person's command would be), waited for; its output and exit status are returned."""
        options = [*(f"--setenv={k}={v}" for k, v in (env or {}).items()), *(f"--property={p}" for p in properties)]
        return self.run(["systemd-run", "--wait", "--pipe", "--quiet", *options, *argv], check=check,
                        timeout=timeout)

    def path(self, inside: str) -> Path:
        """A path of the container's file system, from the host."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run(["systemctl", *args], check=check).stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "--value", "-p", prop, unit)

    def stop(self) -> None:
        """A clean poweroff (SIGRTMIN+3 to its init), else SIGKILL to nspawn."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        try:
            os.kill(self.pid1, signal.SIGRTMIN + 3)
            self.nspawn.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.nspawn.kill()
            self.nspawn.wait(30)
