"""The handoff protocol over real AF_UNIX sockets, pipes and pidfds, both halves: the handler's
(platform/forward.py) and the accept loop's (services/serve/handoffs.py). Exactly one side reads the kernel's
pipe, a handoff from anyone but root, or a malformed one, is not taken, and no handler waits on another."""

from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
from support import need

from corepipe.platform import coredump_socket, forward
from corepipe.services.serve import handoffs

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


class Loop:
    """The accept loop's side as serve has it (services/serve/handoffs.py): a poller, the open handoffs, journal
    entries written to ``journal`` as services/forwarded.py's ``note`` would."""

    def __init__(self, journal: Path, refuse: str | None = None):
        self.poller = select.poll()
        self.stats = types.SimpleNamespace(forward_refused=0)
        self.journal, self.notes = journal, 0
        self.handoffs = handoffs.Handoffs(self.poller, lambda got: refuse, self._note, self.stats)

    def _note(self, got: forward.Forwarded) -> str:
        self.notes += 1
        path = self.journal / str(self.notes)
        path.write_text("\0".join(got.argv))
        return str(path)

    def run(self, server: socket.socket, seconds: float = 5.0) -> list:
        """Accept one connection, then step its handoff until it is settled: the handoffs that are ours."""
        conn = server.accept()[0]
        fd = conn.fileno()
        taken = [self.handoffs.add(conn)]
        deadline = time.monotonic() + seconds
        while fd in self.handoffs.open and time.monotonic() < deadline:
            taken += [self.handoffs.step(fd) for fd, _ in self.poller.poll(100)]
        return [h for h in taken if h is not None]


def test_the_server_takes_the_pipe_and_the_pidfd(tmp_path: Path, server: socket.socket) -> None:
    need(os.geteuid() == 0, "the server takes handoffs from root only")
    read, write = os.pipe()
    pidfd = os.pidfd_open(os.getpid())
    handler = _handler(tmp_path / "f.sock", _argv(pidfd), read)
    loop = Loop(tmp_path)
    [taken] = loop.run(server)
    assert _exit_code(handler) == 0
    got = taken.got
    assert got.argv == _argv(pidfd) and got.pidfd is not None
    assert Path(taken.journal).read_text() == "\0".join(_argv(pidfd)), "journalled before ACCEPT, kept after GO"
    os.write(write, b"\x7fELF core")
    os.close(write)
    assert os.read(got.pipe, 100) == b"\x7fELF core", "the server reads the kernel's pipe"
    assert forward.local_argv(got.argv, got.pidfd)[2 + 9] == str(got.pidfd)
    got.close()
    os.close(read)
    os.close(pidfd)


def test_no_server_busy_or_gone_the_handler_collects(tmp_path: Path, server: socket.socket) -> None:
    need(os.geteuid() == 0, "the server takes handoffs from root only")
    read, _write = os.pipe()
    argv = _argv(0)[:-3] + ["-", "host", "c"]
    assert forward.handoff(argv, str(tmp_path / "absent.sock")) is False
    handler = _handler(tmp_path / "f.sock", argv, read)
    busy = Loop(tmp_path, refuse="the server is saturated")
    assert busy.run(server) == [] and busy.stats.forward_refused == 1 and busy.notes == 0
    assert _exit_code(handler) == 1, "BUSY: the handler collects"
    for goes in ("before ACCEPT", "after ACCEPT"):  # a handler past its deadline, or dead, before its GO
        fds = len(os.listdir("/proc/self/fd"))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(tmp_path / "f.sock"))
        socket.send_fds(client, [forward.MAGIC + b"\0".join(a.encode() for a in argv)], [read])
        quitter = threading.Thread(target=lambda c=client: (c.recv(16), c.close()))
        if goes == "before ACCEPT":
            client.close()
        else:
            quitter.start()
        loop = Loop(tmp_path)
        assert loop.run(server) == [], f"no GO ({goes}): the crash is not the server's"
        assert loop.notes == 1 and not (tmp_path / "1").exists(), "its journal entry goes"
        if goes == "after ACCEPT":
            quitter.join()
        assert len(os.listdir("/proc/self/fd")) == fds, "the server's copies of the pipe are closed"


def test_a_silent_handler_holds_up_nobody(tmp_path: Path, server: socket.socket, caplog) -> None:
    """A connection that sends nothing stays open while the next handler is taken at once; it is dropped only
    after ``handoffs.SECONDS``; a GO that came before that last look is still taken."""
    need(os.geteuid() == 0, "the server takes handoffs from root only")
    read, _write = os.pipe()
    argv = _argv(0)[:-3] + ["-", "host", "c"]
    loop = Loop(tmp_path)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(str(tmp_path / "f.sock"))
    assert loop.handoffs.add(server.accept()[0]) is None and len(loop.handoffs) == 1
    handler = _handler(tmp_path / "f.sock", argv, read)
    taken = loop.run(server)
    assert _exit_code(handler) == 0 and len(taken) == 1 and len(loop.handoffs) == 1, "taken past the silent one"
    taken[0].got.close()
    late = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # its GO arrives unseen by the poller
    late.connect(str(tmp_path / "f.sock"))
    socket.send_fds(late, [forward.MAGIC + b"\0".join(a.encode() for a in argv)], [read])
    assert loop.handoffs.add(server.accept()[0]) is None
    assert late.recv(16) == forward.ACCEPT
    late.send(forward.GO)
    assert loop.handoffs.expire(time.monotonic()) == [], "nothing is due yet"
    later = loop.handoffs.expire(time.monotonic() + handoffs.SECONDS + 1)
    assert len(later) == 1 and later[0].got.argv == argv and len(loop.handoffs) == 0
    later[0].got.close()
    assert silent.recv(16) == b"", "the silent one is closed: its handler collects"
    for sock in (silent, late):
        sock.close()
    os.close(read)


def test_a_go_sent_as_the_server_gives_up_is_taken_or_fails(tmp_path: Path, server: socket.socket,
                                                           monkeypatch) -> None:
    """The handler that sends its GO just after the server's last look, before the server closes the
    connection (here: while the server logs the drop), must see its send fail and collect the crash itself;
    otherwise it exits believing the server has the crash the server drops. So with a handler whose message
    also came only at the last look (ACCEPT sent then)."""
    need(os.geteuid() == 0, "the server takes handoffs from root only")
    read, _write = os.pipe()
    message = forward.MAGIC + b"\0".join(a.encode() for a in _argv(0)[:-3] + ["-", "host", "c"])
    for message_at in ("accept", "the last look"):
        loop = Loop(tmp_path)
        late = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        late.connect(str(tmp_path / "f.sock"))
        if message_at == "accept":
            socket.send_fds(late, [message], [read])
        assert loop.handoffs.add(server.accept()[0]) is None
        if message_at == "accept":
            assert late.recv(16) == forward.ACCEPT
        else:
            socket.send_fds(late, [message], [read])
        sent = []

        def go_now(*_: object, late: socket.socket = late, sent: list = sent, message_at: str = message_at) -> None:
            """The handler runs between the server's last look and its close."""
            if message_at != "accept":
                late.settimeout(1)
                assert late.recv(16) == forward.ACCEPT
            try:
                late.send(forward.GO)
                sent.append(True)
            except OSError:
                sent.append(False)

        monkeypatch.setattr(handoffs, "log", go_now)
        taken = loop.handoffs.expire(time.monotonic() + 2 * handoffs.SECONDS + 1)
        assert len(sent) == 1 and len(loop.handoffs) == 0
        assert sent[0] == (len(taken) == 1), f"message at {message_at}: a GO that went is the server's, or failed"
        for handoff in taken:
            handoff.got.close()
        late.close()
    os.close(read)


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
