"""The debugger's sandbox (issue 14, items 1 and 8): other users cannot reach it, names in a core lead nowhere.

The core with the hostile link map is a real one: a real process renames libc in its own link map to
a path that climbs out of any sysroot to a FIFO, and gdb's ``gcore`` dumps it.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
from support import need, need_tool, short_tempdir, wait_for
from test_crash_commands import T0, add_crash

from corepipe.domain import backtrace
from corepipe.domain.binaries import HeldFiles
from corepipe.domain.containers import Container
from corepipe.platform import sandbox
from corepipe.platform.store import Store

EVIL = r"""
#include <link.h>
#include <signal.h>
#include <string.h>
extern struct r_debug _r_debug;
int main(int argc, char **argv) {
    for (struct link_map *l = _r_debug.r_map; l; l = l->l_next)
        if (strstr(l->l_name, "libc.so")) l->l_name = argv[1];
    raise(SIGSEGV);
    return 0;
}
"""

_AS_NOBODY = """
import os, signal, sys
pid, fd = int(sys.argv[1]), sys.argv[2]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
for what, attempt in (("read", lambda: open(f"/proc/{pid}/fd/{fd}", "rb").read(4)),
                      ("list", lambda: os.listdir(f"/proc/{pid}/fd")),
                      ("stop", lambda: os.kill(pid, signal.SIGSTOP))):
    try:
        attempt()
        print(what, "allowed")
    except PermissionError:
        print(what, "denied")
"""


def _core_naming(directory: Path, name: str) -> bytes:
    """A real core whose link map names libc ``name`` (the process renamed it, then gdb's gcore dumped it)."""
    gcc, gdb = need_tool("gcc"), need_tool("gdb")
    (directory / "evil.c").write_text(EVIL)
    subprocess.run([gcc, "-g", "-o", str(directory / "evil"), str(directory / "evil.c")], check=True)
    subprocess.run([gdb, "-batch", "-nx", "-ex", "run", "-ex", f"gcore {directory / 'core'}", "--args",
                    str(directory / "evil"), name], check=True, capture_output=True, timeout=120)
    return (directory / "core").read_bytes()


@pytest.fixture(scope="module")
def escaping_core(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(the core's bytes, the FIFO its link map names through /../..)."""
    need(os.geteuid() == 0, "needs root")
    d = tmp_path_factory.mktemp("evil")
    d.chmod(0o755)
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o644)  # readable by anyone: an open for reading blocks until a writer comes
    return _core_naming(d, "/.." * 16 + str(fifo)), fifo


@pytest.fixture(scope="module")
def proc_root_core(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(the core's bytes, the FIFO its link map names through /proc/<this test's pid>/root, which leads out of any
    chroot to this process's root)."""
    need(os.geteuid() == 0, "needs root")
    d = tmp_path_factory.mktemp("procroot")
    d.chmod(0o755)
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o644)
    return _core_naming(d, "/.." * 16 + f"/proc/{os.getpid()}/root" + str(fifo)), fifo


def test_other_users_cannot_read_the_debuggers_fds_nor_signal_it(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root")
    secret = tmp_path / "secret"
    secret.write_bytes(b"CORE")
    fd = os.open(secret, os.O_RDONLY)
    uid = sandbox.free_uid()
    os.fchown(fd, uid, uid)
    work = short_tempdir()
    jail = sandbox.Jail(str(work / "jail"), [])
    jail.prepare()
    child = subprocess.Popen(["/bin/sleep", "60"], pass_fds=[fd], preexec_fn=sandbox.preexec(jail, uid),
                             start_new_session=True)
    try:
        # The debugger is the child of the one that made its namespaces, which keeps no fd.
        children = Path(f"/proc/{child.pid}/task/{child.pid}/children")
        debugger = int(wait_for(lambda: children.read_text().split(), what="the debugger")[0])
        waiter_fds = os.listdir(f"/proc/{child.pid}/fd")
        probe = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(debugger), str(fd)], capture_output=True,
                               text=True, timeout=60)
        status = Path(f"/proc/{debugger}/status").read_text()
    finally:
        child.kill()
        child.wait()
        os.close(fd)
        shutil.rmtree(work)
    assert probe.stdout.split("\n")[:3] == ["read denied", "list denied", "stop denied"], probe.stdout + probe.stderr
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status and "NoNewPrivs:\t1" in status
    assert "NSpid:\t" in status and status.split("NSpid:")[1].split()[1] == "1"  # first of its PID namespace
    assert waiter_fds == []
    assert wait_for(lambda: not Path(f"/proc/{debugger}").exists(), what="the debugger to die with its parent")
    assert uid not in (0, 65534) and f":{uid}:" not in Path("/etc/passwd").read_text()


def test_free_uid_is_used_by_nothing() -> None:
    used = sandbox._used_ids()
    assert {0, os.getuid()} <= used
    for _ in range(20):
        uid = sandbox.free_uid()
        assert uid not in used and sandbox.UID_RANGE[0] <= uid <= sandbox.UID_RANGE[1]


def _stored(tmp_path: Path, core: bytes) -> tuple:
    store = tmp_path / "store"
    (tmp_path / "c.toml").write_text(f'store = "{store}"\nbacktrace_timeout = 20\n')
    path, rec = add_crash(store, container=Container(runtime="host"), when=T0, comm="evil", core=core, tmp=tmp_path)
    return store, path, rec


def test_backtrace_of_a_core_whose_link_map_escapes(tmp_path: Path, escaping_core: tuple) -> None:
    core, _fifo = escaping_core
    store, path, rec = _stored(tmp_path, core)
    with Store(str(store)) as opened:
        result = backtrace.take(opened.fd, str(path), rec, HeldFiles(), timeout=20, max_core_size=1 << 30)
    assert result is not None and result["error"] is None, result
    assert "Thread 1" in result["text"] and "#0" in result["text"], result["text"]  # it ran, and did not hang


class _Debuginfod(http.server.BaseHTTPRequestHandler):
    """A debuginfod server on loopback that has nothing and notes every path asked for."""

    asked: list = []

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.asked.append(self.path)
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


def test_debug_of_a_core_whose_link_map_escapes(tmp_path: Path, escaping_core: tuple) -> None:
    """It runs and does not hang, and debuginfod is never asked though DEBUGINFOD_URLS names a live server (gdb
    would fetch the debug info of every build id the hostile core names)."""
    core, _fifo = escaping_core
    _store, _path, rec = _stored(tmp_path, core)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Debuginfod)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        env = {**os.environ, "DEBUGINFOD_URLS": url}
        proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "debug",
                               rec["id"], "--", "-batch", "-ex", "show debuginfod enabled",
                               "-ex", "show debuginfod urls", "-ex", "info sharedlibrary", "-ex", "bt"],
                              capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "#0" in proc.stdout, proc.stdout + proc.stderr
    assert 'Debuginfod functionality is currently set to "off"' in proc.stdout, proc.stdout
    assert url not in proc.stdout + proc.stderr and _Debuginfod.asked == [], _Debuginfod.asked


def test_debug_of_a_core_whose_link_map_leads_through_proc(tmp_path: Path, proc_root_core: tuple) -> None:
    """Issue 30 item 3: gdb runs as root in debug; the host's /proc/<pid>/root would take a library name (and gdb's
    own commands) to any host file. Its /proc is its own PID namespace's, where only gdb is (as 1)."""
    core, _fifo = proc_root_core
    _store, _path, rec = _stored(tmp_path, core)
    outside = tmp_path / "written-from-the-jail"
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "debug", rec["id"],
                           "--", "-batch", "-ex", "info sharedlibrary", "-ex", "bt",
                           "-ex", f"dump binary value /proc/{os.getpid()}/root{outside} 42", "-ex", "print 1"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "#0" in proc.stdout, proc.stdout + proc.stderr  # it did not hang on the host's FIFO
    assert not outside.exists()


def _python_in_jail(script: str, uid: Optional[int]) -> subprocess.CompletedProcess:
    """The system's python3 running ``script`` in an empty Jail (with ``uid``, as that uid)."""
    need(os.geteuid() == 0, "needs root")
    work = short_tempdir()
    try:
        jail = sandbox.Jail(str(work / "jail"), [])
        jail.prepare()
        return subprocess.run(["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=60,
                              preexec_fn=sandbox.preexec(jail, uid))
    finally:
        shutil.rmtree(work)


def test_the_jail_sees_only_its_own_processes_and_no_network(tmp_path: Path) -> None:
    """The backtrace's sandbox (a one-off uid in the jail): only itself in /proc, so no other process's command
    line (the issue's probe read them all), and no connection to a loopback listener the test holds. The same
    script outside the jail, as the same uid, reaches both: the checks can fail."""
    need(os.geteuid() == 0, "needs root")
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    other = subprocess.Popen(["sleep", "120"])
    script = ("import os, socket\n"
              "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1])\n"
              "print(open('/proc/1/cmdline', 'rb').read().split(b'\\0')[1].decode())\n"
              "try:\n"
              f"    print(open('/proc/{other.pid}/cmdline', 'rb').read().split(b'\\0')[0].decode())\n"
              "except OSError as exc:\n"
              "    print('no cmdline', exc.errno)\n"
              "try:\n"
              f"    socket.create_connection(('127.0.0.1', {port}), 5)\n"
              "    print('connected')\n"
              "except OSError as exc:\n"
              "    print('no network', exc.errno)\n")
    uid = sandbox.free_uid()
    try:
        proc = _python_in_jail(script, uid)
        outside = subprocess.run(["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=60,
                                 preexec_fn=lambda: (os.setgroups([]), os.setgid(uid), os.setuid(uid)))
    finally:
        listener.close()
        other.kill()
        other.wait()
    assert proc.returncode == 0, proc.stderr
    alone, first, cmdline, network = proc.stdout.splitlines()
    assert alone == "True" and first == "-I", proc.stdout  # only itself, the first process of its namespace
    assert cmdline.startswith("no cmdline") and network.startswith("no network"), proc.stdout
    assert outside.stdout.splitlines()[2:] == ["sleep", "connected"], outside.stdout + outside.stderr


def test_a_root_debugger_has_no_capabilities(tmp_path: Path) -> None:
    """debug's gdb stays uid 0 (the core, saved copies and sources are root's) but can do nothing root could:
    no mknod, mount, chroot or open by handle, not even in the jail's own directories."""
    script = ("import os, re\n"
              "status = open('/proc/self/status').read()\n"
              "print(os.getuid(), sorted(set(re.findall(r'Cap(?:Inh|Prm|Eff|Bnd|Amb):\\t(\\w+)', status))))\n"
              "for name, attempt in (('mknod', lambda: os.mknod('/made', 0o600 | 0o060000, os.makedev(8, 0))),\n"
              "                      ('mkdir', lambda: os.mkdir('/made')), ('chroot', lambda: os.chroot('/usr'))):\n"
              "    try:\n"
              "        attempt()\n"
              "        print(name, 'allowed')\n"
              "    except OSError as exc:\n"
              "        print(name, 'refused')\n")
    proc = _python_in_jail(script, None)
    assert proc.stdout.splitlines() == ["0 ['0000000000000000']", "mknod refused", "mkdir refused",
                                        "chroot refused"], proc.stdout + proc.stderr


def test_the_debuggers_status_is_the_callers(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root")
    work = short_tempdir()
    try:
        jail = sandbox.Jail(str(work / "jail"), [])
        jail.prepare()
        exited = subprocess.run(["/bin/sh", "-c", "exit 3"], preexec_fn=sandbox.preexec(jail, None), timeout=60)
        child = subprocess.Popen(["/bin/sleep", "60"], preexec_fn=sandbox.preexec(jail, None))
        children = Path(f"/proc/{child.pid}/task/{child.pid}/children")
        os.kill(int(wait_for(lambda: children.read_text().split(), what="the debugger")[0]), signal.SIGKILL)
        killed = child.wait(timeout=60)
    finally:
        shutil.rmtree(work)
    assert (exited.returncode, killed) == (3, 128 + signal.SIGKILL)


def test_debug_refuses_a_core_bigger_than_its_temporary_filesystem(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to mount a small tmpfs")
    from support import mounted_tmpfs

    zeros = b"\x7fELF" + bytes(32 << 20)  # 32 MiB of zero pages: a few KiB compressed
    _store, _path, rec = _stored(tmp_path, zeros)
    small = tmp_path / "small"
    small.mkdir()
    with mounted_tmpfs(small, "8m"):
        proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "debug",
                               "--debugger", "true", rec["id"]], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "TMPDIR": str(small)})
        leftovers = list(small.iterdir())
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "32M uncompressed" in proc.stderr and "set TMPDIR" in proc.stderr
    assert leftovers == []


def test_extract_refuses_a_core_bigger_than_the_target_filesystem(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to mount a small tmpfs")
    from support import mounted_tmpfs

    _store, _path, rec = _stored(tmp_path, b"\x7fELF" + bytes(32 << 20))
    small = tmp_path / "small"
    small.mkdir()
    with mounted_tmpfs(small, "8m"):
        proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "extract",
                               rec["id"], "-o", str(small / "core")], capture_output=True, text=True, timeout=60)
        leftovers = list(small.iterdir())
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "32M uncompressed" in proc.stderr and leftovers == []


def test_a_source_directory_is_bound_read_only_and_alone(tmp_path: Path) -> None:
    """A bound source directory is readable at its own path and the debugger starts in it; it cannot be written,
    and its siblings on the host are not there (its parent is the jail's own, read-only too)."""
    need(os.geteuid() == 0, "needs root")
    tmp_path.chmod(0o755)
    source, sibling = tmp_path / "src", tmp_path / "sibling"
    for d in (source, sibling):
        d.mkdir()
        (d / "hoge.c").write_text("int main() { return 0; }\n")
    work = short_tempdir()
    try:
        jail = sandbox.Jail(str(work / "jail"), [(str(source), str(source))], cwd=str(source))
        jail.prepare()
        proc = subprocess.run(["/bin/sh", "-c", 'pwd; cat hoge.c; echo x > new || echo "write failed"; '
                               'ls ../sibling || echo "no sibling"; mkdir ../made || echo "no mkdir"'],
                              preexec_fn=sandbox.preexec(jail, None), capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(work)
    lines = proc.stdout.splitlines()
    assert lines == [str(source), "int main() { return 0; }", "write failed", "no sibling", "no mkdir"], proc
    assert "Read-only file system" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sibling", "src"] and os.listdir(source) == ["hoge.c"]


def test_which_source_directories_may_be_bound(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to give a directory to another uid")
    tmp_path.chmod(0o755)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    (tmp_path / "link").symlink_to(mine)
    (tmp_path / "file").write_text("")
    refusal = sandbox.source_refusal
    for path in ("/", "/proc/self", "/dev", "/sys/kernel"):  # would undo the jail, whoever names them
        assert refusal(path, "user") is not None, path
    assert refusal(str(tmp_path / "file"), "user") == "not a directory"
    assert refusal(str(tmp_path / "missing"), "user") is not None
    assert [refusal(str(shared), who) is None for who in ("user", "cwd", "binary")] == [True, False, False]
    assert [refusal(str(mine), who) is None for who in ("user", "cwd", "binary")] == [True, True, True]
    assert [refusal(str(theirs), who) is None for who in ("user", "cwd", "binary")] == [True, True, False]
    assert [refusal(str(tmp_path / "link"), who) is None for who in ("user", "cwd", "binary")] == [True, True, False]
    for path in ("/tmp", "/root", "/var/lib/docker", "/run/containerd"):  # named by a binary: never
        if os.path.isdir(path):
            assert refusal(path, "binary") is not None, path


def test_debug_refuses_a_source_option_it_cannot_bind(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "store"}"\n')
    for option in (["--source", str(tmp_path / "missing")], ["--source", "/"], ["--substitute-path", "/src", "/proc"],
                   ["--source", "/a:b"]):
        proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "debug",
                               *option], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and option[0] in proc.stderr, proc.stderr


def test_a_remote_record_never_names_the_operators_files(tmp_path: Path) -> None:
    """A host process's files are used in place when no copy was saved, but not for a crash fetched from a fleet
    store: a node's record could name any file of the operator's machine."""
    from corepipe.commands import debug_cmd

    rec = {"container": {"runtime": "host"}, "exe": "/bin/sh",
           "binaries": {"files": [{"path": "/bin/sh", "exe": True, "stored": False},
                                  {"path": "/etc/passwd", "stored": False}]}}
    assert debug_cmd.links(str(tmp_path), rec, remote=False) == [("/bin/sh", "/bin/sh"), ("/etc/passwd", "/etc/passwd")]
    assert debug_cmd.links(str(tmp_path), rec, remote=True) == []
    assert debug_cmd._executable(rec, {}, remote=False) == "/bin/sh"
    assert debug_cmd._executable(rec, {}, remote=True) is None
