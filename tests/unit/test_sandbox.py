"""The debugger's sandbox (issue 14, items 1 and 8): other users cannot reach it, names in a core lead nowhere.

The core with the hostile link map is a real one: a real process renames libc in its own link map to
a path that climbs out of any sysroot to a FIFO, and gdb's ``gcore`` dumps it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import need, need_tool, short_tempdir
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


@pytest.fixture(scope="module")
def escaping_core(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(the core's bytes, the FIFO its link map names through /../..)."""
    need(os.geteuid() == 0, "needs root")
    gcc, gdb = need_tool("gcc"), need_tool("gdb")
    d = tmp_path_factory.mktemp("evil")
    d.chmod(0o755)
    (d / "evil.c").write_text(EVIL)
    subprocess.run([gcc, "-g", "-o", str(d / "evil"), str(d / "evil.c")], check=True)
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o644)  # readable by anyone: an open for reading blocks until a writer comes
    name = "/.." * 16 + str(fifo)
    subprocess.run([gdb, "-batch", "-nx", "-ex", "run", "-ex", f"gcore {d / 'core'}", "--args", str(d / "evil"), name],
                   check=True, capture_output=True, timeout=120)
    return (d / "core").read_bytes(), fifo


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
        probe = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(child.pid), str(fd)], capture_output=True,
                               text=True, timeout=60)
        status = Path(f"/proc/{child.pid}/status").read_text()
    finally:
        child.kill()
        child.wait()
        os.close(fd)
        shutil.rmtree(work)
    assert probe.stdout.split("\n")[:3] == ["read denied", "list denied", "stop denied"], probe.stdout + probe.stderr
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status and "NoNewPrivs:\t1" in status
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


def test_debug_of_a_core_whose_link_map_escapes(tmp_path: Path, escaping_core: tuple) -> None:
    core, _fifo = escaping_core
    _store, _path, rec = _stored(tmp_path, core)
    env = {**os.environ, "DEBUGINFOD_URLS": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "debug", rec["id"],
                           "--", "-batch", "-ex", "info sharedlibrary", "-ex", "bt"],
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "#0" in proc.stdout, proc.stdout + proc.stderr


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
    and its siblings on the host are not there (its parent is the jail's own, in the debugger's work directory)."""
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
                               'ls ../sibling || echo "no sibling"; mkdir ../made'],
                              preexec_fn=sandbox.preexec(jail, None), capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(work)
    lines = proc.stdout.splitlines()
    assert lines == [str(source), "int main() { return 0; }", "write failed", "no sibling"], proc
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
