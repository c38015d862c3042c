"""install / status / selftest / uninstall and install/install.sh against the real kernel.

Every test holds support.KernelSettings for its whole sequence, so the real core_pattern and
core_pipe_limit come back even if uninstall is broken; uninstall's own restore is checked
byte for byte against the values KernelSettings saved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from runtimes import docker_usable
from support import (
    CORE_PATTERN,
    HERE,
    PIPE_LIMIT,
    SYSTEMD_RUNS,
    SYSTEMD_UNITS,
    KernelSettings,
    check_restored,
    core_digest,
    crash,
    decompress,
    installed_files,
    need,
    need_root_kernel,
)

from corepipe.domain import catalog
from corepipe.platform import slots, store
from corepipe.services import install

FOREIGN = "|/bin/false %p"


@pytest.fixture
def settings() -> KernelSettings:
    need_root_kernel()
    with KernelSettings() as ks:
        yield ks


def cli(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corepipe", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def install_args(d: Path) -> list:
    return ["--config", f"{d}/c.toml", "--bin", f"{d}/b", "--sysctl-dir", f"{d}/sd", "--store", f"{d}/s"]


def wait_record(store: Path, exe: str, timeout: float = 30) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path, rec in catalog.iter_records(str(store)):
            if rec["exe"] == exe and rec["status"] != "collecting":
                return path, rec
        time.sleep(0.05)
    raise AssertionError(f"no record for {exe} in {store}")


def test_install_collect_status_uninstall(settings: KernelSettings, handler_dir: Path, crasher: Path,
                                          tmp_path: Path) -> None:
    d = handler_dir
    proc = cli("install", *install_args(d))
    assert proc.returncode == 0, proc.stderr
    state = json.loads((d / install.STATE_NAME).read_text())
    pattern = CORE_PATTERN.read_text().rstrip("\n")
    assert pattern == state["pattern"] and pattern.startswith(f"|{d}/b collect --config {d}/c.toml %P %p ")
    assert ("%F" in pattern.split()) == install.kernel_has_pidfd(os.uname().release)
    assert PIPE_LIMIT.read_text() == f"{install.PIPE_LIMIT}\n"
    assert state["previous"]["kernel.core_pattern"].encode() + b"\n" == settings.saved_pattern

    crash([str(crasher)])
    path, rec = wait_record(d / "s", str(crasher))
    assert rec["status"] == "complete" and rec["container"]["runtime"] == "host"
    data = decompress(Path(path) / "core.zst", tmp_path / "core")
    assert core_digest(data) == rec["core"]["digest"]

    proc = cli("status", "--json", "--config", f"{d}/c.toml")
    facts = json.loads(proc.stdout)
    assert proc.returncode == 0 and facts["active"] and facts["problems"] == [], proc.stdout
    assert facts["store"]["crashes"] == 1 and facts["store"]["used_bytes"] > 0
    assert [(g["runtime"], g["crashes"], g["cores"]) for g in facts["store"]["containers"]] == [("host", 1, 1)]
    assert facts["store"]["recent"][0]["pid"] == rec["pid"]
    text = cli("status", "--config", f"{d}/c.toml").stdout
    assert "healthy" in text and f"pid {rec['pid']} (crasher) SIGSEGV" in text

    settings.set(FOREIGN)
    proc = cli("status", "--config", f"{d}/c.toml")
    assert proc.returncode == 4 and "drifted" in proc.stdout
    settings.set(state["pattern"], pipe_limit=install.PIPE_LIMIT)

    proc = cli("uninstall", "--config", f"{d}/c.toml")
    assert proc.returncode == 0, proc.stderr
    check_restored(settings, d)
    assert Path(path, "core.zst").exists(), "uninstall without --purge keeps the cores"
    assert cli("status", "--config", f"{d}/c.toml").returncode == 3


def test_install_twice_changes_nothing(settings: KernelSettings, handler_dir: Path) -> None:
    d = handler_dir
    assert cli("install", *install_args(d)).returncode == 0
    before = {p: (Path(p).read_bytes(), Path(p).stat().st_mtime_ns) for p in installed_files(d)}
    limit_before = PIPE_LIMIT.read_bytes()
    proc = cli("install", *install_args(d))
    assert proc.returncode == 0 and proc.stdout.startswith("already installed; nothing changed"), proc.stdout
    assert {p: (Path(p).read_bytes(), Path(p).stat().st_mtime_ns) for p in installed_files(d)} == before
    assert PIPE_LIMIT.read_bytes() == limit_before
    assert cli("uninstall", "--config", f"{d}/c.toml").returncode == 0
    check_restored(settings, d)


def test_foreign_handler_needs_force(settings: KernelSettings, handler_dir: Path) -> None:
    d = handler_dir
    settings.set(FOREIGN, pipe_limit=3)
    proc = cli("install", *install_args(d))
    assert proc.returncode == 1 and "--force" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert CORE_PATTERN.read_text() == FOREIGN + "\n" and PIPE_LIMIT.read_text() == "3\n"
    assert os.listdir(d) == []
    assert cli("install", "--force", *install_args(d)).returncode == 0
    assert CORE_PATTERN.read_text().startswith(f"|{d}/b ")
    assert cli("uninstall", "--config", f"{d}/c.toml").returncode == 0
    assert CORE_PATTERN.read_text() == FOREIGN + "\n" and PIPE_LIMIT.read_text() == "3\n"


def test_read_only_proc_sys_is_a_clear_error(settings: KernelSettings, handler_dir: Path) -> None:
    d = handler_dir
    unshare = shutil.which("unshare")
    need(unshare is not None, "needs unshare (util-linux)")
    # /proc/sys read-only in a private mount namespace: what an unprivileged container sees.
    script = 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'
    proc = subprocess.run([unshare, "--mount", "sh", "-c", script, "sh", sys.executable, "-m", "corepipe",
                           "install", *install_args(d)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "read-only" in proc.stderr and "host" in proc.stderr
    assert os.listdir(d) == []
    assert CORE_PATTERN.read_bytes() == settings.saved_pattern


def test_selftest(settings: KernelSettings, handler_dir: Path) -> None:
    d = handler_dir
    need(docker_usable(), "needs a usable docker for the container half of the selftest")
    proc = cli("selftest", "--config", f"{d}/c.toml")
    assert proc.returncode == 1 and "not installed" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert cli("install", *install_args(d)).returncode == 0
    proc = cli("selftest", "--config", f"{d}/c.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "host process: pid" in proc.stdout and "xxh3-128 verified" in proc.stdout
    assert "container: docker" in proc.stdout and "container id matches" in proc.stdout
    assert list(catalog.iter_records(f"{d}/s")) == [], "selftest must remove the records it made"
    own = (store.LOCK, store.STATE, store.LEDGER)  # the store's bookkeeping, and the storm slots' lock files
    saved = [p for p in Path(f"{d}/s").rglob("*")
             if p.is_file() and p.name not in own and p.parent.name != slots.DIRECTORY]
    assert saved == [], "selftest must remove the binaries its crashes saved"
    assert list(Path(f"{d}/s").glob("docker/*")) == [], "the throwaway container's directory is removed"
    leftovers = subprocess.run(["docker", "ps", "-a", "-q", "--filter", "name=corepipe-selftest"],
                               capture_output=True, text=True).stdout
    images = subprocess.run(["docker", "images", "-q", "corepipe-selftest"], capture_output=True, text=True).stdout
    assert leftovers == "" and images == ""
    assert cli("uninstall", "--config", f"{d}/c.toml").returncode == 0
    check_restored(settings, d)


def test_install_sh_then_selftest_then_uninstall(settings: KernelSettings, handler_dir: Path) -> None:
    """The README's first command, then again as the Azure Batch start task (same store): safe to re-run."""
    d = handler_dir
    need(os.path.exists("/usr/bin/python3"), "install.sh builds its virtualenv with /usr/bin/python3")
    need(docker_usable(), "needs a usable docker for the selftest's container crash")
    env = dict(os.environ, COREPIPE_PREFIX=f"{d}/v", COREPIPE_BIN=f"{d}/b", COREPIPE_CONFIG=f"{d}/c.toml")
    install_sh = HERE.parent / "install" / "install.sh"
    store = f"{d}/sh/corepipe"
    # Should this process die mid-test, the watchdog uninstalls (the systemd units of a systemd host too).
    settings.undo_on_abort(["env", *(f"{k}={env[k]}" for k in ("COREPIPE_PREFIX", "COREPIPE_BIN", "COREPIPE_CONFIG")),
                            "bash", str(HERE.parent / "install" / "uninstall.sh"), "--purge"])
    first = subprocess.run(["bash", str(install_sh), "--store", store, "--sysctl-dir", f"{d}/sd"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "selftest passed" in first.stdout and "container: docker" in first.stdout
    assert Path(f"{d}/b").read_text().startswith(f"#!{d}/v/bin/python -IS\n")
    start_task = HERE.parent / "install" / "azure-batch" / "start-task.sh"
    again = subprocess.run(["bash", str(start_task), "--sysctl-dir", f"{d}/sd"],
                           env=dict(env, AZ_BATCH_NODE_SHARED_DIR=f"{d}/sh"), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already installed; nothing changed" in again.stdout and "selftest passed" in again.stdout
    # The prune timer: enabled by install.sh where systemd runs, not written where it does not (no branch that
    # checks nothing: a host without systemd checks the second); gone after uninstall either way (check_restored).
    if SYSTEMD_RUNS:
        enabled = subprocess.run(["systemctl", "is-enabled", "corepipe-prune.timer"], capture_output=True, text=True)
        assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr
    else:
        assert not any(os.path.lexists(unit) for unit in SYSTEMD_UNITS), "units installed where systemd does not run"
    proc = subprocess.run(["bash", str(HERE.parent / "install" / "uninstall.sh"), "--purge"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_restored(settings, d)
    assert not os.path.exists(store) and not os.path.exists(f"{d}/v")
