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
    LOCK_FD_ENV,
    NO_RATE_LIMIT,
    PIPE_LIMIT,
    SYSTEMD_DIR,
    KernelSettings,
    changes,
    check_restored,
    core_digest,
    crash,
    decompress,
    fingerprint,
    installed_files,
    need,
    need_root_kernel,
    need_tool,
    units_dir,
    wait_for,
)

from corepipe.domain import catalog
from corepipe.platform import config as configuration
from corepipe.platform import slots, store
from corepipe.services import install

FOREIGN = "|/bin/false %p"
REPO = HERE.parent


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
    program = state["forwarder"] or f"{d}/b"  # the static forwarder where a compiler is
    assert pattern == state["pattern"] and pattern.startswith(f"|{program} collect --config {d}/c.toml %P %p ")
    assert ("%F" in pattern.split()) == install.kernel_has_pidfd(os.uname().release)
    assert PIPE_LIMIT.read_text() == f"{install.PIPE_LIMIT}\n"
    assert state["previous"]["kernel.core_pattern"].encode() + b"\n" == settings.start_pattern

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


def _record(store: Path, comm: str) -> dict:
    return wait_for(lambda: next((r for _p, r in catalog.iter_records(str(store))
                                  if r["comm"] == comm and r["status"] != "collecting"), None),
                    60, f"the record of {comm}")


def test_installed_static_forwarder_hands_crashes_to_serve(settings: KernelSettings, handler_dir: Path,
                                                           crasher: Path) -> None:
    """With a C compiler, install makes the static forwarder the pattern's program (root's, 0755, beside the
    launcher), and ``--mode auto`` (the default) picks pipe mode with it also on a kernel with the coredump socket
    (the pipe carries a big core faster); with serve running (in the installed mode) a crash through the kernel is
    collected by serve's worker (transport forwarded) and the pattern stays the forwarder's; with serve stopped the
    forwarder executes the launcher, which collects it alone; status names the forwarder; uninstall removes it."""
    need_tool("gcc")
    d = handler_dir
    run = d / "run"
    # The server's metrics on any free port (concurrent tests), no crash-loop limit for the two crashes.
    config = f'metrics_listen = "127.0.0.1:0"\n{NO_RATE_LIMIT}'
    (d / "c.toml").write_text(config)
    proc = cli("install", *install_args(d), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    forwarder = d / "corepipe-forward"
    assert f"handler: the static forwarder {forwarder}" in proc.stdout and "mode: pipe" in proc.stdout
    if "socket" in Path("/proc/sys/kernel/core_modes").read_text().split():
        assert install.AUTO_PIPE in proc.stdout
    pattern = CORE_PATTERN.read_text()
    assert pattern.startswith(f"|{forwarder} collect --config {d}/c.toml %P %p ")
    info = forwarder.stat()
    assert info.st_mode & 0o7777 == 0o755 and info.st_uid == 0
    server = subprocess.Popen([f"{d}/b", "--config", f"{d}/c.toml", "serve", "--run-dir", str(run)],
                              env={}, cwd="/", stdout=subprocess.DEVNULL, stderr=(d / "serve.err").open("w"))
    try:
        wait_for(lambda: (run / "serve.json").exists() or server.poll() is not None, 30, "the server to start")
        assert server.poll() is None, (d / "serve.err").read_text()
        facts = json.loads(cli("status", "--json", "--config", f"{d}/c.toml").stdout)
        assert (facts["mode"], facts["active_mode"]) == ("pipe", "pipe") and CORE_PATTERN.read_text() == pattern
        assert facts["handler"] == {"program": str(forwarder), "kind": "static forwarder"}
        assert facts["transport"] == "forwarded" and facts["forwarding"]["works"], facts["forwarding"]
        crash([str(crasher), "0", "via-serve"])
        served = _record(d / "s", "via-serve")
        assert served["collector"]["transport"] == "forwarded" and served["core"]["stored"], served
    finally:
        server.terminate()
        server.wait(60)
    wait_for(lambda: not handlers_of(str(run)) and not (run / "forward.sock").exists(), 60, "the server to stop")
    crash([str(crasher), "0", "alone"])
    alone = _record(d / "s", "alone")
    assert alone["collector"]["transport"] == "pipe" and alone["core"]["stored"], alone
    assert cli("uninstall", "--config", f"{d}/c.toml").returncode == 0
    assert (d / "c.toml").read_text() == config, "uninstall gives the user's config back"
    (d / "c.toml").unlink()
    check_restored(settings, d)


def test_without_a_compiler_install_falls_back_to_the_launcher(settings: KernelSettings, handler_dir: Path,
                                                               crasher: Path) -> None:
    d = handler_dir
    env = dict(os.environ, PATH=str(d / "no-compiler"))
    proc = cli("install", *install_args(d), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "handler: the Python launcher" in proc.stdout and "no C compiler on PATH" in proc.stdout
    if "socket" in Path("/proc/sys/kernel/core_modes").read_text().split():
        assert "auto picked socket mode: no static forwarder was built" in proc.stdout
    assert CORE_PATTERN.read_text().startswith(f"|{d}/b collect ") and not (d / "corepipe-forward").exists()
    crash([str(crasher), "0", "launcher"])
    rec = _record(d / "s", "launcher")
    assert rec["collector"]["transport"] == "pipe" and rec["core"]["stored"]
    facts = json.loads(cli("status", "--json", "--config", f"{d}/c.toml").stdout)
    assert facts["handler"] == {"program": f"{d}/b", "kind": "python launcher"}
    assert cli("uninstall", "--config", f"{d}/c.toml").returncode == 0
    check_restored(settings, d)


def test_the_install_tests_leave_an_installation_on_the_host_as_it_was(settings: KernelSettings, handler_dir: Path,
                                                                      crasher: Path) -> None:
    """The README's two commands in their order: corepipe installed (in temporary paths here, standing for the
    host's), then install tests: they pass, and the installation is as it was and still collects crashes."""
    d = handler_dir
    assert cli("install", *install_args(d)).returncode == 0
    pattern, limit = CORE_PATTERN.read_bytes(), PIPE_LIMIT.read_bytes()
    crash([str(crasher)])
    wait_record(d / "s", str(crasher))
    wait_for(lambda: not handlers_of(f"{d}/b"), 60, "the handler to finish its bookkeeping")
    before = fingerprint([str(d)], kernel=False)
    names = ("test_install_collect_status_uninstall", "test_install_twice_changes_nothing",
             "test_foreign_handler_needs_force")
    tests = [f"{__file__}::{name}" for name in names]
    # This test holds the settings lock: the run inside uses it as its own (support.LOCK_FD_ENV).
    lock = settings.lock.fileno()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                          env={**os.environ, LOCK_FD_ENV: str(lock)}, pass_fds=(lock,), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert changes(before, fingerprint([str(d)], kernel=False)) == []
    assert (CORE_PATTERN.read_bytes(), PIPE_LIMIT.read_bytes()) == (pattern, limit)
    crash([str(crasher), "0", "after-tests"])
    rec = wait_for(lambda: next((r for _p, r in catalog.iter_records(f"{d}/s")
                                 if r["comm"] == "after-tests" and r["status"] != "collecting"), None),
                   30, "the record of a crash after the tests")
    assert rec["status"] == "complete" and rec["core"]["stored"]
    assert cli("uninstall", "--config", f"{d}/c.toml").returncode == 0
    check_restored(settings, d)


def handlers_of(launcher: str) -> list:
    """PIDs of the handlers running ``launcher``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and launcher.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


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
    assert CORE_PATTERN.read_text().startswith((f"|{d}/b ", f"|{d}/corepipe-forward "))
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
    assert CORE_PATTERN.read_bytes() == settings.start_pattern


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


#: Man pages of the test's own, for a checkout that has none yet under man/.
TINY_PAGES = {"corepipe.1": ".TH COREPIPE 1\n.SH NAME\ncorepipe \\- test page of test_install_kernel\n",
              "corepipe.toml.5": ".TH COREPIPE.TOML 5\n.SH NAME\ncorepipe.toml \\- test page\n"}


def checkout_copy(d: Path) -> Path:
    """This checkout as install.sh installs it, with man pages under man/: the repository's own, or small ones."""
    copy = d / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, copy / name)
    for name in ("src", "install"):
        shutil.copytree(REPO / name, copy / name, ignore=ignore)
    if (REPO / "man").is_dir():
        shutil.copytree(REPO / "man", copy / "man")
    else:
        (copy / "man").mkdir()
        for name, text in TINY_PAGES.items():
            (copy / "man" / name).write_text(text)
    return copy


def test_install_sh_then_selftest_then_uninstall(settings: KernelSettings, handler_dir: Path) -> None:
    """The README's first command, then again with an extra a message named, then as the Azure Batch start task
    (same store): safe to re-run; then uninstall.sh takes away everything the three wrote."""
    d = handler_dir
    need(os.path.exists("/usr/bin/python3"), "install.sh builds its virtualenv with /usr/bin/python3")
    need(docker_usable(), "needs a usable docker for the selftest's container crash")
    man = need_tool("man")
    checkout = checkout_copy(d)
    units = units_dir(d)
    env = dict(os.environ, COREPIPE_PREFIX=f"{d}/v", COREPIPE_BIN=f"{d}/b", COREPIPE_CONFIG=f"{d}/c.toml",
               COREPIPE_COMPLETION_DIR=f"{d}/bc", COREPIPE_MAN_DIR=f"{d}/man")
    if units != SYSTEMD_DIR:
        env["COREPIPE_UNITS_DIR"] = units
    install_sh = checkout / "install" / "install.sh"
    store = f"{d}/sh/corepipe"
    # Should this process die mid-test, the watchdog uninstalls (the systemd units of a systemd host too).
    settings.undo_on_abort(["env", *(f"{k}={env[k]}" for k in ("COREPIPE_PREFIX", "COREPIPE_BIN", "COREPIPE_CONFIG")),
                            "bash", str(checkout / "install" / "uninstall.sh"), "--purge"])
    first = subprocess.run(["bash", str(install_sh), "--store", store, "--sysctl-dir", f"{d}/sd"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "selftest passed" in first.stdout and "container: docker" in first.stdout
    assert Path(f"{d}/b").read_text().startswith(f"#!{d}/v/bin/python -IS\n")
    if shutil.which("gcc"):  # the forwarder's source is in the installed package: the selftest crashed through it
        assert f"handler: the static forwarder {d}/corepipe-forward" in first.stdout, first.stdout
        assert CORE_PATTERN.read_text().startswith(f"|{d}/corepipe-forward collect ")
    installed = [str(p) for p in Path(f"{d}/v/share/corepipe/files").read_text().splitlines()]

    # The metrics extra by default; the config with every default commented out, and valid.
    corepipe = [f"{d}/b", "--config", f"{d}/c.toml"]
    proc = subprocess.run([*corepipe, "metrics"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "corepipe_" in proc.stdout, proc.stderr
    assert Path(f"{d}/c.toml").read_text() == configuration.template(store)
    assert subprocess.run([*corepipe, "config", "check"], capture_output=True, timeout=120).returncode == 0
    # The bash completion, as the installed corepipe makes it; the man pages, which man finds.
    completion = subprocess.run([f"{d}/b", "completion", "bash"], capture_output=True, text=True).stdout
    assert "complete -F _corepipe corepipe" in completion
    assert Path(f"{d}/bc/corepipe").read_text() == completion
    for page in (checkout / "man").iterdir():
        target = Path(f"{d}/man/man{page.suffix[1:]}/{page.name}")
        assert target.read_bytes() == page.read_bytes() and str(target) in installed
    shown = subprocess.run([man, "-M", f"{d}/man", "-P", "cat", "corepipe"], capture_output=True, text=True,
                           env=dict(os.environ, MANWIDTH="80"), timeout=60)
    assert shown.returncode == 0 and "corepipe" in shown.stdout.lower(), shown.stderr
    if units != SYSTEMD_DIR:  # written, not enabled
        prune = Path(units, "corepipe-prune.service").read_text()
        assert f"ExecStart={d}/b --config {d}/c.toml prune\n" in prune and Path(units, "corepipe-prune.timer").exists()
    assert {f"{d}/bc/corepipe", f"{units}/corepipe-prune.timer"} <= set(installed)

    # A missing extra names install.sh with --with: run as given (with this test's own paths), it installs it.
    proc = subprocess.run([*corepipe, "ship", "--once", "--to", "s3://bucket/prefix"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.split("install it with: ")[1].strip() == f"bash {install_sh} --with s3"
    again = subprocess.run(["bash", str(install_sh), "--with", "s3", "--sysctl-dir", f"{d}/sd"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already installed; nothing changed" in again.stdout
    nowhere = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    proc = subprocess.run([*corepipe, "ship", "--once", "--to", "s3://bucket/prefix"], capture_output=True, text=True,
                          timeout=300, env=nowhere)
    assert "extra" not in proc.stderr, proc.stderr

    # The start task: the same installation again; the extras of earlier runs are kept.
    start_task = checkout / "install" / "azure-batch" / "start-task.sh"
    again = subprocess.run(["bash", str(start_task), "--sysctl-dir", f"{d}/sd"],
                           env=dict(env, AZ_BATCH_NODE_SHARED_DIR=f"{d}/sh"), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already installed; nothing changed" in again.stdout and "selftest passed" in again.stdout
    assert "corepipe[metrics,s3]" in again.stdout
    assert subprocess.run([f"{d}/v/bin/python", "-c", "import boto3, prometheus_client"]).returncode == 0
    if units == SYSTEMD_DIR:  # the prune timer path: enabled by install.sh, gone after uninstall (check_restored)
        enabled = subprocess.run(["systemctl", "is-enabled", "corepipe-prune.timer"], capture_output=True, text=True)
        assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr
    proc = subprocess.run(["bash", str(checkout / "install" / "uninstall.sh"), "--purge"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_restored(settings, d, units)
    assert not os.path.exists(store) and not os.path.exists(f"{d}/v")
    assert not [path for path in installed if os.path.lexists(path)]
