"""``corepipe debug``'s gdb through the real kernel (issue 30 item 3): run by root it is a one-off uid with no
capability, no network and no other process in sight; run by a user who is not root it works on their own
crash, in a user namespace that maps only them.

The sandbox is probed with ``--debugger``: debug runs any debugger in the same jail with the same uid, so a
Python probe there reports what gdb would get. The same probe run outside the jail (as the same uid) shows
what each check would see without it, so the test can fail.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import NO_RATE_LIMIT, installed_handler, need, need_tool, set_core_limit, short_tempdir

from corepipe.platform import sandbox

#: What the debugger's process can see and do: its uid and capabilities, the processes in its /proc, another
#: process's command line, a connection to the test's loopback listener, the core (its last argument), a root
#: file (/etc/shadow).
PROBE = """
import os, re, socket, sys
status = open('/proc/self/status').read()
print('uid', os.getuid(), re.search(r'CapEff:\\t(\\w+)', status)[1], re.search(r'NoNewPrivs:\\t(\\d)', status)[1])
print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
for what, attempt in (('cmdline', lambda: open('/proc/%s/cmdline' % os.environ['OTHER'], 'rb').read()),
                      ('connect', lambda: socket.create_connection(('127.0.0.1', int(os.environ['PORT'])), 5)),
                      ('core', lambda: open(sys.argv[-1], 'rb').read(4)),
                      ('shadow', lambda: open('/etc/shadow', 'rb').read(1))):
    try:
        attempt()
        print(what, 'allowed')
    except OSError as exc:
        print(what, 'refused')
"""


def _as(uid: int, home: Path):
    def run() -> None:
        set_core_limit(-1)()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        os.environ["HOME"] = str(home)
    return run


#: The tests' Python lives under /root (pyenv), which only root may enter: for another uid, a mount namespace
#: of the command's own shows /root as an empty directory anyone may enter with only .pyenv in it.
_OPEN_ROOT = """set -e
mkdir -p "$HOME/pyenv"
mount --bind /root/.pyenv "$HOME/pyenv"
mount -t tmpfs -o mode=0755 tmpfs /root
mkdir /root/.pyenv
mount --bind "$HOME/pyenv" /root/.pyenv
exec setpriv --reuid="$AS" --regid="$AS" --clear-groups "$@"
"""


def corepipe_as(uid: int, home: Path, config: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    """``corepipe --config CONFIG ARGS`` run by ``uid`` (0: root), in ``home`` (its HOME too)."""
    argv = [sys.executable, "-m", "corepipe", "--config", str(config), *args]
    if uid:
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _OPEN_ROOT, "sh", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=str(home), stdin=subprocess.DEVNULL,
                          env={**os.environ, **env, "HOME": str(home), "AS": str(uid)})


def _probe(config: Path, crash_id: str, uid: int, home: Path, port: int, other: int) -> list:
    """The probe run as ``corepipe debug``'s debugger, by ``uid`` (0: root)."""
    proc = corepipe_as(uid, home, config, "debug", "--debugger", f"/usr/bin/python3 -I -c {shlex.quote(PROBE)}",
                       crash_id, env={"PORT": str(port), "OTHER": str(other)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_debug_runs_gdb_as_a_one_off_uid_that_sees_nothing_else(handler_dir: Path, crasher: Path,
                                                                 listener: int) -> None:
    """Root's ``debug``: gdb is a uid no account has, with no capability, alone in its /proc, off the network,
    and can read the core it was given but no root file."""
    need_tool("gdb")
    with installed_handler(handler_dir, NO_RATE_LIMIT) as handler:
        subprocess.run([str(crasher), "0", "dbgroot"], preexec_fn=set_core_limit(-1), timeout=120, cwd="/")
        rec = handler.wait_record(lambda r: r["comm"] == "dbgroot", 60)
    other = subprocess.Popen(["sleep", "120"])
    try:
        lines = _probe(handler.config, rec["id"], 0, handler_dir, listener, other.pid)
        outside = subprocess.run(["/usr/bin/python3", "-I", "-c", PROBE, "/etc/hostname"], capture_output=True,
                                 text=True, timeout=60, env={"PORT": str(listener), "OTHER": str(other.pid)})
        bt = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(handler.config), "debug", rec["id"],
                             "--", "-batch", "-ex", "bt"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, cwd=str(handler_dir))
    finally:
        other.kill()
        other.wait()
    uid, caps, nnp = lines[0].split()[1:]
    assert sandbox.UID_RANGE[0] <= int(uid) <= sandbox.UID_RANGE[1] and caps == "0000000000000000" and nnp == "1"
    assert lines[1:] == ["pids [1]", "cmdline refused", "connect refused", "core allowed", "shadow refused"], lines
    # Without the jail, the same probe (as root) reaches each of them: the checks above can fail.
    assert outside.stdout.splitlines()[2:] == ["cmdline allowed", "connect allowed", "core allowed",
                                               "shadow allowed"], outside.stdout + outside.stderr
    assert bt.returncode == 0 and "#0" in bt.stdout and " main " in bt.stdout, bt.stdout + bt.stderr


def test_a_user_who_is_not_root_debugs_their_own_crash(handler_dir: Path, crasher: Path, listener: int) -> None:
    """A throwaway uid crashes a program; the crash is handed to them in a store of their own (as a --remote
    download would be); as that uid, ``debug`` gives the backtrace, and its gdb is that uid alone in a user
    namespace: no capability, alone in its /proc, off the network."""
    need_tool("gdb")
    need(os.geteuid() == 0, "needs root to become a throwaway user")
    need(Path("/proc/sys/user/max_user_namespaces").read_text().strip() != "0", "needs user namespaces")
    uid = sandbox.free_uid()
    home = short_tempdir()
    home.chmod(0o755)
    program = handler_dir / "program"
    shutil.copy2(crasher, program)
    program.chmod(0o755)
    other = subprocess.Popen(["sleep", "120"])
    try:
        with installed_handler(handler_dir, NO_RATE_LIMIT) as handler:
            subprocess.run([str(program), "0", "dbguser"], preexec_fn=_as(uid, home), timeout=120, cwd="/")
            rec = handler.wait_record(lambda r: r["comm"] == "dbguser", 60)
            handler.wait_idle()
        assert rec["uid"] == uid
        subprocess.run(["chown", "-R", f"{uid}:{uid}", str(handler.store)], check=True)
        bt = corepipe_as(uid, home, handler.config, "debug", rec["id"], "--", "-batch", "-ex", "bt", env={})
        lines = _probe(handler.config, rec["id"], uid, home, listener, other.pid)
    finally:
        other.kill()
        other.wait()
        shutil.rmtree(home, ignore_errors=True)
    assert bt.returncode == 0, bt.stdout + bt.stderr
    assert "#0" in bt.stdout and " main " in bt.stdout, bt.stdout + bt.stderr
    # uid 0 of its own user namespace (the user outside), without capabilities even there.
    assert lines[0] == "uid 0 0000000000000000 1", lines
    assert lines[1:] == ["pids [1]", "cmdline refused", "connect refused", "core allowed", "shadow refused"], lines
