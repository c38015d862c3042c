"""Hostile input: what the crashing process controls must never steer where or what the handler writes."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cgroups import FakeContainers, crash_in
from support import (
    NO_RATE_LIMIT,
    Handler,
    KernelSettings,
    collect_by_hand,
    crash,
    host_dir,
    installed_handler,
    need,
    need_root_kernel,
    need_tool,
    recycle_pid,
    set_core_limit,
    start_crash,
    wait_log,
)

from corepipe.domain import containers, record, snapshot
from corepipe.platform import slots
from corepipe.platform.config import Config
from corepipe.platform.kernel import build_pattern
from corepipe.platform.store import FAILED


def _host_top(store: Path) -> str:
    """The store's top-level directory this test's host crashes go to ("uid" or "host")."""
    return host_dir(store).relative_to(store).parts[0]


def _store_entries(store: Path) -> set:
    return {p.name for p in store.iterdir()}


NAMES = [b"a/b", b"..", b"../../etc", b"with space", b"new\nline", b"paren)x (", b"\xff\xfe\x80bad",
         b"fifteen_bytes__", b"sixteen_bytes___"]


def test_hostile_comm_names(handler_dir: Path, crasher: Path) -> None:
    with installed_handler(handler_dir, NO_RATE_LIMIT) as handler:
        pids = {}
        for name in NAMES:
            proc = start_crash([os.fsencode(crasher), b"0", name])
            proc.wait(timeout=60)
            pids[proc.pid] = name[:15]
        deadline = time.monotonic() + 60
        while len([r for r in handler.records() if r["status"] != "collecting"]) < len(NAMES):
            assert time.monotonic() < deadline, "not every crash was filed"
            time.sleep(0.05)
        recs = {r["pid"]: r for r in handler.records()}
    assert _store_entries(handler.store) == {_host_top(handler.store), ".lock", ".state.json", ".ledger.json",
                                             slots.DIRECTORY}
    for pid, name in pids.items():
        rec = recs[pid]
        text = name.decode("utf-8", "surrogateescape")
        assert rec["process"]["comm"] == text.replace("\udcff", "\ufffd").replace("\udcfe", "\ufffd").replace(
            "\udc80", "\ufffd")
        # %e as the kernel escapes it: '/' becomes '!', and so does the first dot of "." and "..".
        escaped = text.replace("/", "!")
        assert rec["comm"] == ("!" + escaped[1:] if escaped in (".", "..") else escaped), (rec["comm"], text)
        assert Path(rec["_dir"]).parent == host_dir(handler.store) and rec["core"]["stored"]
        lines = wait_log(f"id {rec['id']}")  # logged after the final record is written
        assert len(lines) == 1, lines


def test_hostile_exe_path(handler_dir: Path, crasher: Path) -> None:
    weird = os.fsencode(handler_dir) + b"/dir with space/..\xff)\n"
    os.makedirs(weird)
    exe = weird + b"/crash )er\nname"
    shutil.copy2(crasher, exe)
    with installed_handler(handler_dir, NO_RATE_LIMIT) as handler:
        crash([exe, b"0"])
        rec = handler.wait_record(lambda r: True)
    assert rec["exe"] == os.fsdecode(exe) and rec["cmdline"][0] == os.fsdecode(exe).replace("\udcff", "\ufffd")
    assert rec["comm"] == "crash )er\nname"[:15]
    assert Path(rec["_dir"]).parent == host_dir(handler.store) and rec["core"]["stored"]
    assert _store_entries(handler.store) == {_host_top(handler.store), ".lock", ".state.json", ".ledger.json",
                                             slots.DIRECTORY}


def test_megabytes_of_cmdline_and_environ(kernel_handler, crasher: Path) -> None:
    def big_stack() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, (256 << 20, 256 << 20))
        set_core_limit(resource.RLIM_INFINITY)()
    args = ["0", "bigargs"] + ["A" * 100_000] * 30
    env = {f"VAR{i}": "B" * 30_000 for i in range(30)}  # 900 KB: all of it within the 1 MiB read of environ
    proc = subprocess.run([str(crasher), *args], env=env, preexec_fn=big_stack, timeout=120)
    assert proc.returncode == -signal.SIGSEGV
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "bigargs")
    assert rec["status"] == "complete" and rec["core"]["stored"]
    # Bounded (record_field_max, 64 KiB in all) before anything else looks at them, the cuts listed.
    limit = Config.record_field_max
    assert rec["cmdline"][:3] == [str(crasher), "0", "bigargs"] and set(rec["cmdline"][3]) == {"A"}, rec["cmdline"][:3]
    assert sum(len(a) for a in rec["cmdline"]) <= limit and "cmdline[4:]" in rec["truncated"], rec["truncated"]
    # Not in env_keep: names kept, values redacted.
    assert [e for e in rec["process"]["environ"] if e.startswith("VAR")] == [f"VAR{i}=<redacted>" for i in range(30)]
    assert (Path(rec["_dir"]) / "record.json").stat().st_size < record.MAX_SIZE


def test_crafted_cgroup_paths_through_the_kernel(kernel_handler, crasher: Path,
                                                 fake_containers: FakeContainers) -> None:
    outer = fake_containers.new()
    inner = fake_containers.new(f"docker-{outer}.scope")  # a fake scope made inside another container
    crash_in(fake_containers, inner, [str(crasher), "0", "nested"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "nested")
    # Plain cgroups with no runtime behind them: what was seen is recorded, neither id gets the crash.
    container = rec["container"]
    assert container["id"] == inner and [o["id"] for o in container["details"]["outer"]] == [outer]
    assert container["confidence"] == "likely" and "does not confirm" in container["details"]["unconfirmed"]
    assert Path(rec["_dir"]).parent == kernel_handler.store / "uid" / str(os.getuid())
    assert not (kernel_handler.store / "docker").exists()

    deep = fake_containers.parent
    for i in range(16):
        deep = deep / (f"docker-{'a' * 64}.scope.{i}" + "x" * 150)
    deep.mkdir(parents=True)
    crash_in(fake_containers, deep, [str(crasher), "0", "longpath"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "longpath")
    assert len(rec["container"]["cgroup"]) > 3000
    assert Path(rec["_dir"]).parent == kernel_handler.store / "uid" / str(os.getuid()) and rec["core"]["stored"]
    for part in Path(rec["_dir"]).relative_to(kernel_handler.store).parts:
        assert len(part) <= 100 and part not in (".", "..")


@pytest.mark.parametrize("text", [
    "0::/../../../etc/docker/" + "f" * 64,
    "0::/docker/../../../" + "e" * 64,
    "0::/kubepods/../../x/pod/../..\n1:name=systemd:/../..",
    "0::/" + "../" * 2000 + "x",
    "0::/system.slice/docker-" + "1" * 64 + ".scope/docker-" + "2" * 64 + ".scope",
    "0::/a\n0::/docker/" + "3" * 64 + "/\n",
])
def test_crafted_cgroup_texts_never_make_a_path(text: str) -> None:
    container = containers.identify(text)
    confirmed = dataclasses.replace(container, confidence="certain")  # as if the runtime's state agreed
    for part in (*container.policy_group(0), *confirmed.policy_group(0)):
        assert "/" not in part and part not in ("", ".", "..") and not part.startswith(".") and len(part) <= 100
    if "1" * 64 in text:
        assert container.id == "2" * 64 and container.outer[0].id == "1" * 64  # innermost, outer recorded


def test_planted_links_and_files_in_the_store(kernel_handler, crasher: Path, handler_dir: Path) -> None:
    store = kernel_handler.store
    crash([str(crasher), "0", "first"])
    kernel_handler.wait_record(lambda r: r["comm"] == "first")
    kernel_handler.wait_idle()  # the ledger is written after the record
    outside = handler_dir / "outside"
    outside.write_text("not yours\n")
    before = outside.stat()
    (store / ".lock").unlink()
    (store / ".lock").symlink_to(outside)
    (store / ".state.json").unlink()
    os.link(outside, store / ".state.json")
    crash([str(crasher), "0", "planted"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "planted")
    assert rec["core"]["stored"] and rec["status"] == "complete"
    assert outside.read_text() == "not yours\n" and outside.stat().st_mtime == before.st_mtime
    assert outside.stat().st_nlink == 1, "the hard link was written through instead of replaced"
    assert stat.S_ISREG((store / ".lock").lstat().st_mode) and json.loads((store / ".state.json").read_text())
    assert wait_log(f"{store}/.lock is not a plain file of ours")

    (store / ".lock").unlink()
    os.mkfifo(store / ".lock")
    crash([str(crasher), "0", "fifo"])
    assert kernel_handler.wait_record(lambda r: r["comm"] == "fifo")["core"]["stored"]
    kernel_handler.wait_idle()

    elsewhere = handler_dir / "elsewhere"
    elsewhere.mkdir()
    top = store / _host_top(store)
    shutil.rmtree(top)
    top.symlink_to(elsewhere)
    proc = start_crash([str(crasher), "0", "hostlink"])
    proc.wait(timeout=60)
    assert "a symlink?" in wait_log(f"pid {proc.pid}: cannot create its directory under ")[0]
    assert list(elsewhere.iterdir()) == []
    orphan = kernel_handler.wait_record(lambda r: r["comm"] == "hostlink")  # recorded, root-only, listed
    assert Path(orphan["_dir"]).parent == store / FAILED and "a symlink?" in orphan["core"]["reason"]

    top.unlink()
    os.mkfifo(top)
    proc = start_crash([str(crasher), "0", "hostfifo"])
    proc.wait(timeout=60)  # the handler must not block opening a FIFO
    wait_log(f"pid {proc.pid}: cannot create its directory under ")
    assert kernel_handler.wait_record(lambda r: r["comm"] == "hostfifo")["status"] == "failed"
    top.unlink()
    crash([str(crasher), "0", "healed"])
    assert kernel_handler.wait_record(lambda r: r["comm"] == "healed")["core"]["stored"]


def test_loose_store_permissions_are_tightened_and_foreign_owner_refused(kernel_handler, crasher: Path) -> None:
    store = kernel_handler.store
    crash([str(crasher), "0", "first"])
    kernel_handler.wait_record(lambda r: r["comm"] == "first")
    kernel_handler.wait_idle()
    store.chmod(0o777)
    host_dir(store).chmod(0o775)
    crash([str(crasher), "0", "loose"])
    kernel_handler.wait_record(lambda r: r["comm"] == "loose")
    kernel_handler.wait_idle()
    assert stat.S_IMODE(store.stat().st_mode) == 0o700 and stat.S_IMODE(host_dir(store).stat().st_mode) == 0o700
    os.chown(store, 65534, 65534)
    try:
        proc = start_crash([str(crasher), "0", "foreign"])
        proc.wait(timeout=60)
        assert "owned by uid 65534" in wait_log(f"pid {proc.pid} ('foreign'): cannot open the store")[0]
        assert len(kernel_handler.records()) == 2
    finally:
        os.chown(store, 0, 0)


def test_store_replaced_by_a_symlink(kernel_handler, crasher: Path, handler_dir: Path) -> None:
    store = kernel_handler.store
    crash([str(crasher), "0", "first"])
    kernel_handler.wait_record(lambda r: r["comm"] == "first")
    kernel_handler.wait_idle()
    real = handler_dir / "real-store"
    store.rename(real)
    store.symlink_to(real)
    before = sorted(real.rglob("*"))
    proc = start_crash([str(crasher), "0", "redirected"])
    proc.wait(timeout=60)
    assert "a symlink?" in wait_log(f"pid {proc.pid} ('redirected'): cannot open the store")[0]
    assert sorted(real.rglob("*")) == before


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def test_setuid_dump_mode_2_stays_root_only(kernel_handler, crasher: Path, handler_dir: Path) -> None:
    suid = handler_dir / "suid-crasher"
    shutil.copy2(crasher, suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    need_tool("gdb")  # a backtrace would be taken, were it not for the dump mode
    dumpable = Path("/proc/sys/fs/suid_dumpable")
    saved = dumpable.read_text()
    kernel_handler.settings.undo_on_abort(["sh", "-c", f"echo {saved.strip()} > {dumpable}"])
    try:
        dumpable.write_text("2")
        proc = subprocess.run([str(suid), "0", "setuid"], preexec_fn=_as_nobody, timeout=60)
        assert proc.returncode == -signal.SIGSEGV
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "setuid")
    finally:
        dumpable.write_text(saved)
    assert rec["dump_mode"] == 2 and rec["uid"] == 65534 and rec["core"]["stored"]
    # gdb never reads a root-only core (it would run as an unprivileged uid on root's core).
    assert rec["backtrace"]["text"] is None and rec["backtrace"]["frames"] is None, rec["backtrace"]
    assert "dump mode 2" in rec["backtrace"]["error"], rec["backtrace"]
    crash_dir = Path(rec["_dir"])
    for path in (crash_dir / "record.json", crash_dir / "core.zst"):
        st = path.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    for d in (crash_dir, crash_dir.parent, kernel_handler.store):
        assert d.stat().st_uid == 0 and stat.S_IMODE(d.stat().st_mode) == 0o700
    probe = ("import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'rb').read(1)\n"
             "        print('READ', p)\n    except OSError:\n        pass\n")
    out = subprocess.run(["python3", "-c", probe, str(crash_dir / "record.json"), str(crash_dir / "core.zst")],
                         preexec_fn=_as_nobody, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "READ" not in out.stdout, out.stdout + out.stderr


def test_secret_environment_is_redacted_by_default_and_configurable(kernel_handler, crasher: Path) -> None:
    env = {"API_TOKEN": "hunter2-token", "DB_PASSWORD": "hunter2-pw", "HARMLESS": "visible-value",
           "DATABASE_URL": "postgres://app:hunter2-url@db/app", "LANG": "C.UTF-8"}
    crash([str(crasher), "0", "secrets"], env=env)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "secrets")
    text = (Path(rec["_dir"]) / "record.json").read_text()
    assert "hunter2" not in text
    assert {"API_TOKEN=<redacted>", "DB_PASSWORD=<redacted>", "HARMLESS=<redacted>", "DATABASE_URL=<redacted>",
            "LANG=C.UTF-8"} <= set(rec["process"]["environ"])  # kept by allow-list (env_keep)
    kernel_handler.config.write_text(kernel_handler.config.read_text() + 'env_keep = ["*"]\nredact_env = []\n')
    crash([str(crasher), "0", "plain"], env=env)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "plain")
    assert "API_TOKEN=hunter2-token" in rec["process"]["environ"]


def test_the_crashed_process_root_is_never_used(handler_dir: Path, crasher: Path,
                                                fake_containers: FakeContainers) -> None:
    """What the crashed process mounts in its own namespace (the config, /etc/corepipe, Docker's container
    state, the daemon's socket) never reaches corepipe, and corepipe never talks to the daemon: the handler
    runs in a mount namespace of its own where Docker's socket is a fake the test listens on. (Where the
    kernel finds the handler is the kernel's business: a bind over the launcher would test the kernel.)"""
    daemon_sockets = sorted({os.path.realpath(s) for s in ("/run/docker.sock", "/var/run/docker.sock")
                             if stat.S_ISSOCK(_mode(s))})
    need(bool(daemon_sockets), "needs dockerd's socket (/run/docker.sock) to put a fake over it")
    cid = fake_containers.new()
    evil_store = handler_dir / "evil-store"
    evil = handler_dir / "evil"
    evil.mkdir()
    (evil / "c.toml").write_text(f'store = "{evil_store}"\n')
    (evil / "config.v2.json").write_text(json.dumps({"Name": "/evil-name", "Config": {"Image": "evil:image"}}))
    (evil / "etc-corepipe").mkdir()
    (evil / "etc-corepipe" / "config.toml").write_text(f'store = "{evil_store}"\n')
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(evil / "docker.sock"))
    sock.listen(8)
    sock.setblocking(False)
    etc_existed = os.path.exists("/etc/corepipe")  # the script's mkdir reaches the host's /etc
    try:
        with installed_handler(handler_dir, NO_RATE_LIMIT) as handler:
            wrapper = handler_dir / "hw"
            binds = "; ".join(f"{need_tool('mount')} --bind {evil}/docker.sock {s}" for s in daemon_sockets)
            wrapper.write_text(f"#!/bin/sh\nexec {need_tool('unshare')} --mount --propagation private /bin/sh -c "
                               f"'{binds} && exec \"$0\" \"$@\"' {handler.launcher} \"$@\"\n")
            wrapper.chmod(0o755)
            handler.settings.set(build_pattern(str(wrapper), str(handler.config)))
            script = (f"mount --bind {evil}/c.toml {handler.config} && "
                      f"mkdir -p /etc/corepipe && mount --bind {evil}/etc-corepipe /etc/corepipe && "
                      f"mount -t tmpfs tmpfs /var/lib/docker/containers && mkdir /var/lib/docker/containers/{cid} && "
                      f"cp {evil}/config.v2.json /var/lib/docker/containers/{cid}/ && "
                      f"for s in {' '.join(daemon_sockets)}; do mount --bind {evil}/docker.sock $s; done && "
                      f"exec {crasher} 0 foreignroot")
            crash_in(fake_containers, cid, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
            rec = handler.wait_record(lambda r: r["comm"] == "foreignroot")
            handler.wait_idle()
        assert rec["container"]["id"] == cid and rec["container"]["name"] is None
        assert rec["container"]["image"] is None and rec["container"]["confidence"] == "likely"
        assert Path(rec["_dir"]).parent == handler.store / "uid" / str(os.getuid()) and rec["core"]["stored"]
        assert not evil_store.exists()
        with pytest.raises(BlockingIOError):
            sock.accept()
    finally:
        sock.close()
        if not etc_existed and os.path.isdir("/etc/corepipe"):
            os.rmdir("/etc/corepipe")


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def test_pid_reuse_is_detected(kernel_handler) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(victim.pid)
    victim.kill()
    victim.wait()
    impostor = recycle_pid(victim.pid)
    other = subprocess.Popen(["sleep", "60"])
    other_fd = os.pidfd_open(other.pid)
    try:
        for name, fd in (("recycled", pidfd), ("wrongfd", other_fd)):
            proc = collect_by_hand(kernel_handler, impostor.pid, name, pidfd=fd)
            proc.communicate(b"", timeout=60)
            rec = kernel_handler.wait_record(lambda r, name=name: r["comm"] == name)
            assert rec["process"]["trusted"] is False
            owner = -1 if name == "recycled" else other.pid
            assert f"the kernel's pidfd refers to pid {owner}, not {impostor.pid}" in rec["process"][
                "untrusted_reasons"]
            assert rec["container"]["runtime"] == "unknown" and rec["container"]["source"] == "untrusted snapshot"
            # An untrusted snapshot names no container: the crash counts under the kernel's %u.
            assert Path(rec["_dir"]).parent == kernel_handler.store / "uid" / str(rec["uid"])
        proc = collect_by_hand(kernel_handler, impostor.pid, "rightfd", pidfd=os.pidfd_open(impostor.pid))
        proc.communicate(b"", timeout=60)
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "rightfd")
        assert rec["process"]["trusted"] is True, rec["process"]["untrusted_reasons"]
    finally:
        for p in (impostor, other):
            p.kill()
            p.wait()
        os.close(pidfd)
        os.close(other_fd)


def test_pid_reuse_without_a_pidfd_is_caught_by_the_start_time(handler_dir: Path, crasher: Path) -> None:
    """Kernels before 6.16 give no %F (the pattern then has ``-``): a process that started after the dump time %t
    is not the crashed one, whatever /proc/<pid> says; the crashed process itself started before it."""
    need_root_kernel()
    handler = Handler(handler_dir)
    with KernelSettings() as settings:
        settings.set(handler.pattern(pidfd=False))
        assert " - " in handler.pattern(pidfd=False)
        crash([str(crasher), "0", "nopidfd"])
        own = handler.wait_record(lambda r: r["comm"] == "nopidfd")
        victim = subprocess.Popen(["sleep", "60"])
        dumped = int(time.time())  # the victim's dump
        victim.kill()
        victim.wait()
        time.sleep(snapshot.START_SLACK + 1.5)
        impostor = recycle_pid(victim.pid)
        try:
            proc = collect_by_hand(handler, impostor.pid, "recycled", dump_time=dumped)
            proc.communicate(b"", timeout=60)
            rec = handler.wait_record(lambda r: r["comm"] == "recycled")
        finally:
            impostor.kill()
            impostor.wait()
    assert own["process"]["trusted"] is True and own["process"]["pidfd"] == "absent", own["process"]
    assert rec["process"]["pidfd"] == "absent" and rec["process"]["trusted"] is False
    assert any(reason.endswith("s after the dump time (%t): PID reused")
               for reason in rec["process"]["untrusted_reasons"]), rec["process"]["untrusted_reasons"]
    assert rec["container"]["runtime"] == "unknown" and rec["container"]["source"] == "untrusted snapshot"
    assert Path(rec["_dir"]).parent == handler.store / "uid" / str(rec["uid"])
