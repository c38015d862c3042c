"""install/uninstall/status logic against a fake /proc/sys (plain files) and temporary paths.

The real kernel is exercised in tests/e2e/test_install_kernel.py; here the bookkeeping is
checked: what is saved, what is restored byte for byte, what a refusal leaves untouched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import need, need_tool

from corepipe.domain import catalog, record
from corepipe.domain.containers import Container
from corepipe.platform import config as configuration
from corepipe.platform import kernel, procfs, static_forwarder
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import RECORD, Store
from corepipe.services import install, prune, status
from corepipe.services.install import InstallError, Paths

SYSTEMD = "|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h"


@pytest.fixture
def root(handler_dir: Path) -> Path:
    """A short temporary directory: the whole pattern, paths included, must fit in 127 bytes."""
    return handler_dir


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """A PATH without a C compiler: install falls back to the Python launcher as the pattern's program."""
    monkeypatch.setenv("PATH", str(root / "no-compiler"))


@pytest.fixture
def paths(root: Path, no_compiler: None) -> Paths:
    proc = root / "proc-sys" / "kernel"
    proc.mkdir(parents=True)
    (proc / "core_pattern").write_bytes(b"core\n")
    (proc / "core_pipe_limit").write_bytes(b"0\n")
    return Paths(bin=str(root / "bin" / "cp"), config=str(root / "etc" / "c.toml"),
                 sysctl_dir=str(root / "sysctl.d"), proc_sys=str(root / "proc-sys"))


def kernel_file(paths: Paths, name: str) -> bytes:
    return (Path(paths.proc_sys) / "kernel" / name).read_bytes()


def tree(root: Path) -> dict:
    """Every path under ``root`` with its content and mtime: what 'nothing changed' compares."""
    return {str(p): (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_install_then_uninstall_restores_everything(paths: Paths, root: Path) -> None:
    before = tree(root)
    store = root / "var" / "store"
    install.install(paths, store=str(store), release="6.18.0")
    pattern = kernel.build_pattern(paths.bin, paths.config, pidfd=True)
    assert kernel_file(paths, "core_pattern") == pattern.encode() + b"\n"
    assert kernel_file(paths, "core_pipe_limit") == b"256\n"  # the documented limit, pinned here only
    dropin = Path(paths.dropin).read_text()
    assert f"kernel.core_pattern = {pattern}\n" in dropin
    assert "kernel.core_pipe_limit = 256\n" in dropin
    assert f'store = "{store}"' in Path(paths.config).read_text()
    assert store.is_dir() and (store.stat().st_mode & 0o777) == 0o700
    # The launcher runs as the kernel runs it: empty environment, cwd /.
    proc = subprocess.run([paths.bin, "--version"], env={}, cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("corepipe "), proc.stderr
    saved = json.loads(Path(paths.state).read_text())["previous"]
    assert saved == {"kernel.core_pattern": "core", "kernel.core_pipe_limit": "0"}

    lines = install.uninstall(paths)
    assert any("kept the store" in line for line in lines)
    assert kernel_file(paths, "core_pattern") == b"core\n"
    assert kernel_file(paths, "core_pipe_limit") == b"0\n"
    after = tree(root)
    assert {p for p in after if not p.startswith(str(root / "var"))} == set(before)


def test_purge_deletes_the_store_install_created(paths: Paths, root: Path) -> None:
    store = root / "var" / "store"
    install.install(paths, store=str(store))
    install.uninstall(paths, purge=True)
    assert not (root / "var").exists()


def test_install_twice_changes_nothing(paths: Paths, root: Path) -> None:
    install.install(paths, store=str(root / "var" / "s"))
    before = tree(root)
    lines = install.install(paths, store=str(root / "var" / "s"))
    assert lines[0] == "already installed; nothing changed"
    assert tree(root) == before
    # The saved previous values are still the original ones, not corepipe's own pattern.
    install.uninstall(paths)
    assert kernel_file(paths, "core_pattern") == b"core\n"


def test_foreign_handler_refused_then_forced(paths: Paths, root: Path) -> None:
    (Path(paths.proc_sys) / "kernel" / "core_pattern").write_text(SYSTEMD + "\n")
    before = tree(root)
    with pytest.raises(InstallError, match="systemd-coredump.*--force"):
        install.install(paths, store=str(root / "var" / "s"))
    assert tree(root) == before
    install.install(paths, store=str(root / "var" / "s"), force=True)
    assert kernel_file(paths, "core_pattern").startswith(f"|{paths.bin} collect".encode())
    install.uninstall(paths)
    assert kernel_file(paths, "core_pattern") == SYSTEMD.encode() + b"\n"


def test_another_corepipe_is_foreign(paths: Paths, root: Path) -> None:
    other = kernel.build_pattern("/opt/other/corepipe")
    (Path(paths.proc_sys) / "kernel" / "core_pattern").write_text(other + "\n")
    with pytest.raises(InstallError, match="another corepipe installation"):
        install.install(paths, store=str(root / "var" / "s"))


def test_file_pattern_is_replaced_without_force(paths: Paths, root: Path) -> None:
    (Path(paths.proc_sys) / "kernel" / "core_pattern").write_text("/var/crash/core.%e.%p\n")
    install.install(paths, store=str(root / "var" / "s"))
    install.uninstall(paths)
    assert kernel_file(paths, "core_pattern") == b"/var/crash/core.%e.%p\n"


def test_pidfd_only_on_kernels_that_have_it(paths: Paths, root: Path) -> None:
    install.install(paths, store=str(root / "var" / "s"), release="6.1.0-28-amd64")
    assert kernel_file(paths, "core_pattern").split()[-3:-2] == [b"-"]
    assert install.kernel_has_pidfd("6.16.0") and install.kernel_has_pidfd("7.0.1")
    assert not install.kernel_has_pidfd("6.15.9") and not install.kernel_has_pidfd("5.10.0")


def test_too_long_pattern_changes_nothing(paths: Paths, root: Path) -> None:
    before = tree(root)
    paths.bin = "/" + "b" * 100
    with pytest.raises(InstallError, match="127"):
        install.install(paths, store=str(root / "var" / "s"))
    assert tree(root) == before


def test_kernel_not_keeping_the_pattern_rolls_back(paths: Paths, root: Path) -> None:
    # A core_pattern that reads back something else than was written, as a truncating kernel does.
    pattern_file = Path(paths.proc_sys) / "kernel" / "core_pattern"
    pattern_file.unlink()
    pattern_file.symlink_to("/dev/null")
    before = tree(root)
    with pytest.raises(InstallError, match="kernel kept"):
        install.install(paths, store=str(root / "var" / "s"))
    assert {p: v[0] for p, v in tree(root).items()} == {p: v[0] for p, v in before.items()}
    assert kernel_file(paths, "core_pipe_limit") == b"0\n"


def test_foreign_launcher_refused(paths: Paths, root: Path) -> None:
    Path(paths.bin).parent.mkdir(parents=True)
    Path(paths.bin).write_text("#!/bin/sh\necho someone else's\n")
    Path(paths.bin).chmod(0o751)
    with pytest.raises(InstallError, match="not a corepipe launcher"):
        install.install(paths, store=str(root / "var" / "s"))
    install.install(paths, store=str(root / "var" / "s"), force=True)
    install.uninstall(paths)
    assert Path(paths.bin).read_text() == "#!/bin/sh\necho someone else's\n"
    assert Path(paths.bin).stat().st_mode & 0o777 == 0o751


def test_uninstall_leaves_a_pattern_changed_since(paths: Paths, root: Path) -> None:
    install.install(paths, store=str(root / "var" / "s"))
    (Path(paths.proc_sys) / "kernel" / "core_pattern").write_text(SYSTEMD + "\n")
    lines = install.uninstall(paths)
    assert any("changed since install" in line for line in lines)
    assert kernel_file(paths, "core_pattern") == SYSTEMD.encode() + b"\n"
    assert not Path(paths.bin).exists() and not Path(paths.dropin).exists()


def test_store_must_be_dedicated(paths: Paths) -> None:
    with pytest.raises(InstallError, match="dedicated"):
        install.install(paths, store="/var")


def test_status_codes(paths: Paths, root: Path) -> None:
    need(os.geteuid() == 0, "needs root: status reads the default store")
    assert status.gather(paths)["code"] == status.NOT_INSTALLED
    install.install(paths, store=str(root / "var" / "s"))
    facts = status.gather(paths)
    assert facts["code"] == status.HEALTHY and facts["active"] and facts["problems"] == []
    assert facts["store"]["path"] == str(root / "var" / "s") and facts["store"]["crashes"] == 0
    limit = Path(paths.proc_sys) / "kernel" / "core_pipe_limit"
    limit.write_text("0\n")
    assert status.gather(paths)["code"] == status.DRIFTED
    limit.write_text(f"{install.PIPE_LIMIT}\n")
    os.unlink(paths.bin)
    assert status.gather(paths)["code"] == status.BROKEN
    (Path(paths.proc_sys) / "kernel" / "core_pattern").write_text(SYSTEMD + "\n")
    assert status.gather(paths)["code"] == status.DRIFTED


def test_status_names_a_bad_ship_to_once_and_collection_stays_healthy(paths: Paths, root: Path) -> None:
    """A ship_to that is no destination stops only 'corepipe ship' (the collector does not read it): one problem
    line, exit healthy; a bad key the collector reads makes it broken, that line alone (not a second for ship_to)."""
    install.install(paths, store=str(root / "var" / "s"))
    config = Path(paths.config)
    config.write_text(config.read_text() + 'ship_to = "ftp://nowhere/x"\n')
    facts = status.gather(paths)
    assert facts["code"] == status.HEALTHY, facts["problems"]
    [problem] = facts["problems"]
    assert "ship_to: 'ftp://nowhere/x' is not a destination" in problem and "'corepipe ship' stops" in problem
    config.write_text(config.read_text() + "compression_level = 99\n")
    facts = status.gather(paths)
    assert facts["code"] == status.BROKEN
    [problem] = facts["problems"]
    assert "compression_level" in problem and "falls back" in problem


def test_install_builds_the_static_forwarder(paths: Paths, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a C compiler, the pattern's program is the static forwarder, built beside the launcher with the
    server's socket and the launcher compiled in, 0755 and root's; status names it; uninstall removes it."""
    monkeypatch.setenv("PATH", os.defpath)
    need_tool("gcc")
    _core_modes(paths, "file", "pipe", "socket")  # auto picks pipe mode with the forwarder even so
    before = tree(root)
    sock = str(root / "run" / "forward.sock")
    lines = install.install(paths, store=str(root / "var" / "s"), release="6.18.0", forward_socket=sock, mode="auto")
    assert install.AUTO_PIPE in lines and "mode: pipe" in " ".join(lines)
    forwarder = Path(paths.bin).parent / "corepipe-forward"
    assert kernel_file(paths, "core_pattern") == kernel.build_pattern(str(forwarder), paths.config).encode() + b"\n"
    assert f"handler: the static forwarder {forwarder}, the launcher {paths.bin} when serve does not take a crash" \
        in lines
    info = forwarder.stat()
    assert info.st_mode & 0o7777 == 0o755 and info.st_uid == os.geteuid()
    assert static_forwarder.show(str(forwarder)) == {"socket": sock, "handler": paths.bin}
    assert f"main(forward={sock!r})" in Path(paths.bin).read_text()
    facts = status.gather(paths)
    assert facts["handler"] == {"program": str(forwarder), "kind": "static forwarder"}
    assert facts["forwarding"]["socket"] == sock and facts["problems"] == [] and facts["mode"] == "pipe"
    lines = install.install(paths, store=str(root / "var" / "s"), release="6.18.0", forward_socket=sock, mode="auto")
    assert lines[0] == "already installed; nothing changed" and "auto kept the installed pipe mode" in lines[-1]
    forwarder.chmod(0o644)
    assert "the static forwarder" in " ".join(status.gather(paths)["problems"])
    install.uninstall(paths)
    assert {p for p in tree(root) if not p.startswith(str(root / "var"))} == set(before)


def test_without_a_compiler_the_launcher_is_the_program(paths: Paths, root: Path) -> None:
    lines = install.install(paths, store=str(root / "var" / "s"), release="6.18.0")
    assert kernel_file(paths, "core_pattern").startswith(f"|{paths.bin} collect ".encode())
    assert not (Path(paths.bin).parent / "corepipe-forward").exists()
    assert f"handler: the Python launcher {paths.bin} (the static forwarder was not built: no C compiler on PATH " \
           "(cc, gcc, clang))" in lines
    assert status.gather(paths)["handler"] == {"program": paths.bin, "kind": "python launcher"}


def file_crash(store: Path, container: Container, pid: int) -> str:
    """A crash filed the way the collector files it (store.Store + record.build), without a core."""
    with Store(str(store)) as s:
        crash = s.new_crash(container.policy_group(0))
        try:
            rec = record.build(crash_id=crash.id, args=KernelArgs(pid=pid, signal=11, comm="x", time=1700000000 + pid),
                               snapshot=None, container=container, redact_env=[])
            rec["status"] = "complete"
            crash.write(RECORD, record.dumps(rec))
        finally:
            crash.close()
    return crash.path


def test_status_counts_crashes_per_container(root: Path) -> None:
    store = root / "s"
    cid = "ab" * 32
    for pid in (10, 11):
        file_crash(store, Container(runtime="docker", id=cid, confidence="certain", name="web"), pid)
    file_crash(store, Container(), 12)
    summary = status.store_summary(str(store), recent=2)
    assert summary["crashes"] == 3 and summary["errors"] == []
    assert [(g["runtime"], g["id"], g["name"], g["crashes"], g["cores"]) for g in summary["containers"]] == [
        ("docker", cid, "web", 2, 0), ("host", None, None, 1, 0)]
    assert [c["pid"] for c in summary["recent"]] == [12, 11]


def test_purge_keeps_a_store_that_existed_before(root: Path) -> None:
    store = root / "s"
    file_crash(store, Container(), 16)
    file_crash(store, Container(runtime="docker", id="cd" * 32, confidence="certain"), 17)
    assert "deleted 2 crashes" in prune.purge(str(store), created=False)
    assert store.is_dir() and list(catalog.iter_records(str(store))) == []


def _core_modes(paths: Paths, *modes: str) -> None:
    (Path(paths.proc_sys) / "kernel" / "core_modes").write_text("\n".join(modes) + "\n")


def test_mode_auto_picks_pipe_with_the_static_forwarder_else_socket_where_the_kernel_has_it(paths: Paths) -> None:
    """auto: an installation's mode; else pipe with the static forwarder (the kernel's pipe carries a big core to
    serve faster than its socket: docs/performance.md), socket where the kernel has it, else pipe."""
    assert install.choose_mode("auto", paths.proc_sys) == install.PIPE  # no core_modes: before 6.16
    _core_modes(paths, "file", "pipe")
    assert install.choose_mode("auto", paths.proc_sys) == install.PIPE
    assert install.choose_mode("auto", paths.proc_sys, installed=install.SOCKET) == install.PIPE  # socket gone
    with pytest.raises(InstallError, match="no coredump socket mode"):
        install.choose_mode("socket", paths.proc_sys)
    _core_modes(paths, "file", "pipe", "socket")
    assert install.choose_mode("auto", paths.proc_sys) == install.SOCKET
    assert install.choose_mode("auto", paths.proc_sys, forwarder=True) == install.PIPE
    assert install.choose_mode("auto", paths.proc_sys, forwarder=True, installed=install.SOCKET) == install.SOCKET
    assert install.choose_mode("auto", paths.proc_sys, installed=install.PIPE) == install.PIPE
    assert install.choose_mode("pipe", paths.proc_sys) == install.PIPE
    assert install.choose_mode("socket", paths.proc_sys, forwarder=True) == install.SOCKET
    with pytest.raises(InstallError, match="unknown --mode 'sock'"):
        install.choose_mode("sock", paths.proc_sys)


def _health(run_dir: Path, pid: int, heartbeat: float, socket_path: str) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "serve.json").write_text(json.dumps({
        "pid": pid, "pid_start": procfs.started(pid), "heartbeat": heartbeat, "socket": socket_path, "busy": 0,
        "queued": 0, "stats": {"accepted": 3}}))


def test_socket_mode_status_follows_the_server(paths: Paths, root: Path) -> None:
    """Socket mode installs the pipe pattern (the fallback); the server's socket pattern is active only
    while a live server keeps its heartbeat, and uninstall restores the previous pattern from either."""
    _core_modes(paths, "file", "pipe", "socket")
    sock = str(root / "run" / "s.sock")
    run_dir = root / "run"
    lines = install.install(paths, store=str(root / "var" / "s"), mode="auto", socket_path=sock)
    pipe = kernel.build_pattern(paths.bin, paths.config, pidfd=True)
    assert kernel_file(paths, "core_pattern") == pipe.encode() + b"\n"
    assert any(line.startswith("mode: socket") for line in lines)
    assert lines[-1].startswith("auto picked socket mode: no static forwarder was built")  # no compiler here
    facts = status.gather(paths, run_dir=str(run_dir))
    assert (facts["mode"], facts["active_mode"], facts["code"]) == ("socket", "pipe", status.HEALTHY)

    (Path(paths.proc_sys) / "kernel" / "core_pattern").write_text(f"@@{sock}\n")  # as a running server does
    facts = status.gather(paths, run_dir=str(run_dir))
    assert facts["active_mode"] == "socket" and facts["code"] == status.BROKEN
    assert "not running" in facts["problems"][0]
    # A live process that wrote this health file (its start time in it), and a socket listening where the
    # pattern points.
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    listener = socket.socket(socket.AF_UNIX)
    run_dir.mkdir(exist_ok=True)
    listener.bind(sock)
    listener.listen()
    try:
        _health(run_dir, server.pid, time.time(), sock)
        facts = status.gather(paths, run_dir=str(run_dir))
        assert facts["code"] == status.HEALTHY and facts["server"]["alive"] and facts["problems"] == []
        _health(run_dir, server.pid, time.time() - 60, sock)
        facts = status.gather(paths, run_dir=str(run_dir))
        assert facts["code"] == status.BROKEN and "heartbeat" in facts["problems"][0]
        listener.close()
        facts = status.gather(paths, run_dir=str(run_dir))
        assert facts["code"] == status.BROKEN and facts["listener"] is False
        assert any("no listener" in problem for problem in facts["problems"])
    finally:
        listener.close()
        server.kill()
        server.wait()
    install.install(paths, store=str(root / "var" / "s"), mode="socket", socket_path=sock)
    assert kernel_file(paths, "core_pattern") == f"@@{sock}\n".encode(), "a running server's pattern is kept"
    install.uninstall(paths)
    assert kernel_file(paths, "core_pattern") == b"core\n"


def test_the_config_install_writes_is_commented_and_a_users_is_kept(paths: Paths, root: Path) -> None:
    install.install(paths, store=str(root / "var" / "s"))
    assert Path(paths.config).read_text() == configuration.template(str(root / "var" / "s"))
    install.uninstall(paths)
    # A config of the user's: another store changes its store line and nothing else; uninstall puts it back.
    Path(paths.config).parent.mkdir(parents=True, exist_ok=True)
    mine = f'# tuned\nstore = "{root}/var/s"\ncompression_level = 9\n'
    Path(paths.config).write_text(mine)
    os.chmod(paths.config, 0o600)
    install.install(paths, store=str(root / "var" / "t"))
    assert Path(paths.config).read_text() == mine.replace("var/s", "var/t")
    assert os.stat(paths.config).st_mode & 0o777 == 0o600
    install.uninstall(paths)
    assert Path(paths.config).read_text() == mine


def test_an_earlier_installs_config_becomes_the_commented_one(paths: Paths, root: Path) -> None:
    """The config older versions wrote (all 50 keys, uncommented, at their defaults) would pin those defaults."""
    store = str(root / "var" / "s")
    old = configuration.render(configuration.Config(store=store))
    Path(paths.config).parent.mkdir(parents=True, exist_ok=True)
    Path(paths.config).write_text(old)
    lines = install.install(paths)
    assert f"wrote config {paths.config}" in lines
    assert Path(paths.config).read_text() == configuration.template(store)
    install.uninstall(paths)
    assert Path(paths.config).read_text() == old
