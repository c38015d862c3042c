"""The handoff of a crash from the kernel's pipe handler to ``corepipe serve``: the wire protocol, both ends.

On kernels without the coredump socket (and in ``--mode pipe``) the kernel starts a pipe handler per crash.
When a server runs, that handler only passes what the kernel gave it to the server and exits; with a
non-zero ``core_pipe_limit`` the kernel keeps the crashed process until every reader of the pipe has closed
it, so the server's worker reads ``/proc/<pid>`` and the core exactly as in socket mode.

The protocol, on an AF_UNIX SOCK_SEQPACKET socket (``<run dir>/forward.sock``, mode 0600; the server also
checks that the peer is root), three messages:

1. handler -> server: ``MAGIC`` then the handler's arguments (``[--config PATH] %P %p ...``) joined by NUL,
   at most ``MAX_MESSAGE`` bytes, with SCM_RIGHTS carrying the kernel's pipe (the handler's stdin) and, when
   the arguments name one (``%F``), the pidfd.
2. server -> handler: ``ACCEPT`` (one byte) or ``BUSY`` followed by a reason.
3. handler -> server: ``GO``. Only now is the crash the server's: a handler whose answer did not come within
   ``ACK_SECONDS`` closes the connection and collects the crash itself, and a server that sees the
   connection close without ``GO`` drops its copies of the fds without reading a byte. So exactly one of
   them reads the pipe.

src/corepipe/platform/corepipe-forward.c speaks the same protocol for hosts without Python. The client half
(``handoff``) runs first in every crash, before anything else is imported: it needs only ``os``, ``sys`` and
``_socket`` (the C half of ``socket``, without its ``enum``; fds are packed by hand, as ``array`` would load
``collections``), and the argument positions of capture.py.
"""

from __future__ import annotations

import _socket
import os
import stat  # loaded by os already
import sys

from corepipe.platform.capture import ARG_COUNT, CONFIG_OPTION, PIDFD_AT, kernel_ids

DEFAULT_SOCKET = "/run/corepipe/forward.sock"
SOCKET_NAME = "forward.sock"
MAGIC = b"corepipe-forward 1\n"
MAX_MESSAGE = 16384
#: How long the handler waits for the server's answer before it collects the crash itself. Generous: in a storm
#: the server shares the CPUs with every handler starting, so its answers come late (up to 0.75 s for the last
#: of 128 Python handlers on 2 CPUs, docs/forwarding.md); only a server that is alive but stuck costs a crash
#: this wait, and the kernel holds the process meanwhile anyway.
ACK_SECONDS = 5.0
ACCEPT, BUSY, GO = b"A", b"B", b"G"
#: At most this many fds come with a handoff: the pipe and the pidfd.
MAX_FDS = 2


def handoff(argv: list, path: str, seconds: float = ACK_SECONDS) -> bool:
    """Hand the crash on stdin to the server at ``path``: True when it took it (the handler then just exits),
    False when the crash is the handler's to collect (no server, no answer in time, busy, any error)."""
    try:
        _pid, pidfd = kernel_ids(argv)
        message = MAGIC + b"\0".join(os.fsencode(a) for a in argv)
    except (ValueError, UnicodeError):
        return False
    if len(message) > MAX_MESSAGE:
        return False
    fds = [0] if pidfd is None else [0, pidfd]
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(seconds)
        sock.connect(path)
        sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _ints(fds))])
        if sock.recv(256)[:1] != ACCEPT:
            return False
        sock.send(GO)
        return True
    except OSError:  # refused, absent, timed out, reset: the handler collects
        return False
    finally:
        sock.close()


def _ints(values: list) -> bytes:
    """C ints, as SCM_RIGHTS and SO_PEERCRED carry them."""
    return b"".join(v.to_bytes(4, sys.byteorder, signed=True) for v in values)


def _unints(data: bytes) -> list:
    return [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in range(0, len(data) - 3, 4)]


def probe(path: str, seconds: float = ACK_SECONDS) -> str | None:
    """None when a server accepts connections at ``path``, else why not (for ``corepipe status``)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(seconds)
        sock.connect(path)
    except OSError as exc:
        return f"cannot connect to {path}: {exc.strerror or exc}"
    finally:
        sock.close()
    return None


def socket_path(run_dir: str) -> str:
    """Where a server with this run directory listens for handoffs."""
    return os.path.join(run_dir, SOCKET_NAME)


# -- the server's half ----------------------------------------------------------------------------------


class ForwardError(Exception):
    """A handoff that is not to be taken (not root, malformed, wrong fds); the handler collects it."""


class Probe(ForwardError):
    """A connection closed without a message: ``probe`` (``corepipe status``) checking that the server accepts."""


class Forwarded:
    """A crash a handler handed over: its kernel arguments, the kernel's pipe and the pidfd (fds of this
    process, closed by ``close``)."""

    def __init__(self, argv: list, pipe: int, pidfd: int | None):
        self.argv, self.pipe, self.pidfd = argv, pipe, pidfd

    def fds(self) -> list:
        return [self.pipe] if self.pidfd is None else [self.pipe, self.pidfd]

    def close(self) -> None:
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipe, self.pidfd = -1, None


def peer_uid(conn: _socket.socket) -> int:
    """The connecting process's uid (SO_PEERCRED: pid, uid, gid as three ints)."""
    return _unints(conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1]


def receive(conn: _socket.socket) -> Forwarded:
    """The handler's first message on ``conn`` (blocking; the caller sets a timeout); raises ForwardError,
    closing any fd that came, when it is not a root handler's well-formed handoff."""
    message, ancillary, flags, _ = conn.recvmsg(MAX_MESSAGE + 1, _socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += _unints(data)
    got = Forwarded([], fds[0], fds[1] if len(fds) > 1 else None) if fds else None
    if not message and got is None:
        raise Probe("a probe")
    try:
        if peer_uid(conn) != 0:
            raise ForwardError("the peer is not root")
        if flags & (_socket.MSG_CTRUNC | _socket.MSG_TRUNC) or len(fds) > MAX_FDS:
            raise ForwardError("a message or fd list longer than the protocol allows")
        if not message.startswith(MAGIC) or got is None:
            raise ForwardError("not a corepipe handoff")
        got.argv = [os.fsdecode(a) for a in message[len(MAGIC):].split(b"\0")]
        if not stat.S_ISFIFO(os.fstat(got.pipe).st_mode):
            raise ForwardError("the first fd is not the kernel's pipe")
        if (kernel_ids(got.argv)[1] is None) != (got.pidfd is None):
            raise ForwardError("the arguments and the fds disagree on the pidfd")
    except (ForwardError, OSError, ValueError) as exc:
        if got is not None:
            got.close()
        for fd in fds[2:]:
            os.close(fd)
        raise ForwardError(str(exc)) from None
    return got


def refuse(conn: _socket.socket, reason: str) -> None:
    """BUSY with ``reason``: the handler collects the crash itself."""
    try:
        conn.send(BUSY + reason.encode("utf-8", "replace")[:200])
    except OSError:
        pass


def local_argv(argv: list, pidfd: int | None) -> list:
    """``argv`` with its ``%F`` replaced by ``pidfd``, the number this process has for the handler's pidfd."""
    argv = list(argv)
    at = (2 if len(argv) >= 2 and argv[0] == CONFIG_OPTION else 0) + PIDFD_AT
    if pidfd is not None and len(argv) - at + PIDFD_AT == ARG_COUNT:
        argv[at] = str(pidfd)
    return argv
