"""The handoff protocol (platform/forward.py) over real AF_UNIX sockets, pipes and pidfds: exactly one side reads
the kernel's pipe, and a handoff from anyone but root, or a malformed one, is not taken."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import need

from corepipe.platform import coredump_socket, forward

ARGV = ["--config", "/etc/x.toml", "PID", "1", "PID", "0", "0", "11", "1700000000", "0", "1", "FD", "host", "c"]


def _argv(pidfd: int) -> list:
    pid = str(os.getpid())
    return [pid if a == "PID" else str(pidfd) if a == "FD" else a for a in ARGV]


def _handler(path: Path, argv: list, pipe_read: int, seconds: float = 2.0, uid: int | None = None) -> int:
    """A forked handler with ``pipe_read`` as its stdin: its pid; it exits 0 when the server took the crash."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.dup2(pipe_read, 0)
            if uid is not None:
                os.setuid(uid)
            code = 0 if forward.handoff(argv, str(path), seconds) else 1
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def server(tmp_path: Path) -> socket.socket:
    sock = coredump_socket.listen(str(tmp_path / "f.sock"), 8, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    yield sock
    sock.close()


def test_the_server_takes_the_pipe_and_the_pidfd(tmp_path: Path, server: socket.socket) -> None:
    need(os.geteuid() == 0, "the server takes handoffs from root only")
    read, write = os.pipe()
    pidfd = os.pidfd_open(os.getpid())
    handler = _handler(tmp_path / "f.sock", _argv(pidfd), read)
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        got = forward.receive(conn)
        assert forward.take(conn)
    assert _exit_code(handler) == 0
    assert got.argv == _argv(pidfd) and got.pidfd is not None
    os.write(write, b"\x7fELF core")
    os.close(write)
    assert os.read(got.pipe, 100) == b"\x7fELF core", "the server reads the kernel's pipe"
    assert forward.local_argv(got.argv, got.pidfd)[2 + 9] == str(got.pidfd)
    got.close()
    os.close(read)
    os.close(pidfd)


def test_no_server_busy_or_late_the_handler_collects(tmp_path: Path, server: socket.socket) -> None:
    read, _write = os.pipe()
    argv = _argv(0)[:-3] + ["-", "host", "c"]
    assert forward.handoff(argv, str(tmp_path / "absent.sock")) is False
    handler = _handler(tmp_path / "f.sock", argv, read)
    conn, _ = server.accept()
    with conn:
        got = forward.receive(conn)
        forward.refuse(conn, "the server is saturated")
    got.close()
    assert _exit_code(handler) == 1, "BUSY: the handler collects"
    handler = _handler(tmp_path / "f.sock", argv, read, seconds=0.3)
    conn, _ = server.accept()
    with conn:
        got = forward.receive(conn)
        time.sleep(0.6)  # the answer comes after the handler's deadline
        assert forward.take(conn) is False, "a late ACCEPT finds the handler gone: the crash stays the handler's"
    got.close()
    assert _exit_code(handler) == 1
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # a handler that dies before its GO
    client.connect(str(tmp_path / "f.sock"))
    socket.send_fds(client, [forward.MAGIC + b"\0".join(a.encode() for a in argv)], [read])
    conn, _ = server.accept()
    with conn:
        got = forward.receive(conn)
        quitter = threading.Thread(target=lambda: (client.recv(16), client.close()))
        quitter.start()
        assert forward.take(conn) is False, "no GO: the crash is not the server's"
        quitter.join()
    got.close()


def test_only_roots_well_formed_handoffs_are_taken() -> None:
    need(os.geteuid() == 0, "needs root to hand over as another user")
    tmp_path = Path(tempfile.mkdtemp(prefix="cpf-", dir="/tmp"))  # reachable by another user
    tmp_path.chmod(0o755)
    server = coredump_socket.listen(str(tmp_path / "f.sock"), 8, socket.SOCK_SEQPACKET)
    server.settimeout(10)
    read, _write = os.pipe()
    os.chmod(tmp_path / "f.sock", 0o666)  # the mode keeps others out; the uid check must too
    handler = _handler(tmp_path / "f.sock", _argv(0)[:-3] + ["-", "h", "c"], read, uid=65534)
    conn, _ = server.accept()
    with conn, pytest.raises(forward.ForwardError, match="not root"):
        forward.receive(conn)
    assert _exit_code(handler) == 1
    for message, fds in ((b"hello", [read]), (forward.MAGIC + b"1\0" * 20, []),
                         (forward.MAGIC + b"\0".join(a.encode() for a in _argv(5)), [read])):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(tmp_path / "f.sock"))
        socket.send_fds(client, [message], fds)
        conn, _ = server.accept()
        with conn, pytest.raises(forward.ForwardError):
            forward.receive(conn)
        client.close()
    server.close()
    shutil.rmtree(tmp_path)


def test_status_says_why_forwarding_does_not_work(tmp_path: Path, server: socket.socket) -> None:
    """status.forwarding: the launcher's socket, the server's and a real connection must agree."""
    from corepipe.platform import launcher
    from corepipe.services import status

    path = str(tmp_path / "f.sock")
    script = tmp_path / "h"
    script.write_text(launcher.script(forward=path))
    alive = {"alive": True, "forward_socket": path}
    assert status.forwarding(alive, str(script)) == {"works": True, "socket": path, "problem": None}
    assert "not running" in status.forwarding(None, str(script))["problem"]
    elsewhere = status.forwarding({"alive": True, "forward_socket": "/run/x/forward.sock"}, str(script))
    assert not elsewhere["works"] and "--run-dir" in elsewhere["problem"]
    script.write_text(launcher.script().replace(f"main(forward={launcher.DEFAULT_SOCKET!r})", "main()"))
    assert "older corepipe" in status.forwarding(alive, str(script))["problem"]
    script.write_text(launcher.script(forward=path))
    server.close()
    os.unlink(path)
    gone = status.forwarding(alive, str(script))
    assert not gone["works"] and gone["problem"].startswith(f"cannot connect to {path}")


def test_the_static_forwarder_speaks_the_same_protocol() -> None:
    """corepipe-forward.c's constants are forward.py's: the magic, the message bound, the deadline, the
    argument positions (a forwarder built from a drifted copy would be refused, or give up early)."""
    from corepipe.platform import capture, static_forwarder

    source = Path(static_forwarder.SOURCE).read_text()
    defined = {}
    for line in source.splitlines():
        if line.startswith("#define ") and len(line.split(None, 2)) == 3:
            defined[line.split(None, 2)[1]] = line.split(None, 2)[2]
    assert defined["MAGIC"] == '"' + forward.MAGIC.decode().replace("\n", "\\n") + '"'
    assert int(defined["MAX_MESSAGE"]) == forward.MAX_MESSAGE
    assert float(defined["ACK_SECONDS"].split()[0]) == forward.ACK_SECONDS
    assert int(defined["ARG_COUNT"]) == capture.ARG_COUNT and int(defined["PIDFD_AT"]) == capture.PIDFD_AT
