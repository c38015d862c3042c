"""One crash in a forked worker of ``corepipe serve``: a coredump socket peer (the kernel's connection, answered
KERNEL or REJECT before the dump) or a crash a pipe handler forwarded, both through collect's one pipeline.

A worker is forked idle, readies the config, the /proc memory reader and the core's prefix buffer, then waits on
its channel for the one crash the accept loop hands it (a message naming how loaded the server is, and the fds).
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import socket
import time
from typing import Optional

from corepipe.domain.context import Context
from corepipe.platform import affinity, capture, coredump_socket, elf, forward, libc, memread, procfs
from corepipe.platform import config as configuration
from corepipe.platform.fs import unlink_if_present
from corepipe.platform.log import ERR, log
from corepipe.services import collect, forwarded

#: How loaded the server is when a crash's turn comes: NORMAL, FAST (compression level 1) or RECORD_ONLY; LATE:
#: a handed-over crash waited longer than ``forward_wait`` for a worker (record only).
NORMAL, FAST, RECORD_ONLY, LATE = "normal", "fast", "record-only", "late"
SATURATED = "the collector was saturated (too many crashes waiting): record only"
#: How long a worker waits after a REJECT for the process's exit status (its signal) when neither the pidfd
#: (PIDFD_INFO_COREDUMP_SIGNAL) nor /proc/<pid>/stat told it; the status comes only once the process is reaped,
#: and a worker waiting is a worker a storm does not have.
EXIT_WAIT = 1.0
_SO_RCVBUFFORCE = 33


class Prepared:
    """What an idle worker readies before its crash comes: the config, loaded again only if its file changed."""

    def __init__(self, path: Optional[str], keys: Optional[frozenset] = configuration.COLLECTOR):
        self.path = path
        self.keys = keys
        self.stamp = self._stamp()
        self.errors: list = []
        self.cfg = collect.load_config(path, self.errors, keys)

    def _stamp(self) -> Optional[tuple]:
        try:
            st = os.stat(self.path or configuration.DEFAULT_PATH)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self) -> tuple:
        """(config, its problems) as the file is now."""
        if self._stamp() != self.stamp:
            self.errors = []
            self.cfg = collect.load_config(self.path, self.errors, self.keys)
        return self.cfg, list(self.errors)


def run(channel: socket.socket, config: Optional[str], forward_wait: float) -> int:
    """An idle worker: ready the config, the /proc memory reader and the core's prefix buffer, wait for one
    crash from the accept loop (a kernel connection, or a handler's handoff), collect it."""
    prepared = Prepared(config)
    reader = memread.MemoryReader()
    buffer = capture.prefix_buffer()
    try:
        message, fds, _flags, _addr = socket.recv_fds(channel, forward.MAX_MESSAGE + 4096, forward.MAX_FDS)
        channel.close()
        if not fds:
            return 0  # the server is stopping
        head, _, rest = message.decode("utf-8", "surrogateescape").partition("\n")
        accepted, load = head.split()
        journal, *argv = rest.split("\0")
        if not argv:
            return handle(socket.socket(fileno=fds[0]), prepared, float(accepted), load, reader, buffer,
                          journal or None)
        got = forward.Forwarded(argv, fds[0], fds[1] if len(fds) > 1 else None)
        cfg, problems = prepared.current()
        if load == FAST:
            cfg = dataclasses.replace(cfg, compression_level=1)
        refused = {RECORD_ONLY: SATURATED,
                   LATE: f"the crash waited more than {forward_wait:g} s for a worker (serve "
                         "--forward-wait): record only"}.get(load)
        return forwarded.handle(got, journal or None, cfg, problems, float(accepted), refused, reader, buffer)
    finally:
        reader.close()


def handle(conn: socket.socket, prepared: Prepared, accepted: float, load: str,
           reader: Optional[memread.MemoryReader] = None, buffer: Optional[memoryview] = None,
           journal: Optional[str] = None) -> int:
    """One kernel connection: check the peer, read /proc, build the kernel's arguments from the pidfd, then
    collect's pipeline, whose ``before_core`` is the ack (``Peer.answer``); the exit code ``corepipe collect``
    would give. ``journal``: the accept loop's entry of this crash, removed once it has a record."""
    pidfd = coredump_socket.peer_pidfd(conn)
    info = coredump_socket.pidfd_info(pidfd)
    if not info.dumping:
        log(f"error: serve: pid {info.pid} connected to the coredump socket but is not dumping core; ignored", ERR)
        unlink_if_present(journal)
        return 2
    early = capture.take_proc(info.pid, pidfd, reader)
    early.started = accepted
    early.received = time.time() - (time.monotonic() - accepted)
    errors = list(early.errors)
    peer = Peer(conn, info, pidfd, buffer, saturated=load == RECORD_ONLY)
    args = coredump_socket.kernel_args(info, early.proc, when=int(time.time()), hostname=_hostname(info.pid, pidfd),
                                       config=prepared.path)
    cfg, problems = prepared.current()
    errors += problems
    if load == FAST:
        cfg = dataclasses.replace(cfg, compression_level=1)
    signal.signal(signal.SIGALRM, capture.on_alarm)
    signal.alarm(cfg.timeout)
    ctx = Context(args=args, early=early, core_fd=capture.STDIN, cfg=cfg, errors=errors, transport="socket",
                  journal=journal)
    return collect.run_context(ctx, before_core=peer.answer)


class Peer:
    """A coredump socket connection whose crash is ``prepare``d: the request read, then the ack."""

    def __init__(self, conn: socket.socket, info: coredump_socket.PidfdInfo, pidfd: int,
                 buffer: Optional[memoryview], saturated: bool):
        self.conn, self.info, self.pidfd, self.buffer = conn, info, pidfd, buffer
        #: The server is saturated: REJECT whatever the crash (under ``@`` the kernel is not asked: core read).
        self.saturated = saturated

    def answer(self, ctx: Context) -> None:
        """KERNEL (+WAIT) and the start of the core on stdin, or REJECT with ``collect.refusal``'s reason (or
        SATURATED) in ``ctx.refused``: the kernel then writes nothing; an exchange that fails leaves a record
        without a core."""
        conn, early, args = self.conn, ctx.early, ctx.args
        broken: Optional[str] = None
        try:
            request = _request(conn)
        except (coredump_socket.ProtocolError, OSError) as exc:
            request, broken = None, f"coredump socket: {exc}"
        reason = None
        if request is not None:
            reason = SATURATED if self.saturated else collect.refusal(ctx, room=True)
        if request is not None:
            mask = coredump_socket.REJECT if reason else coredump_socket.KERNEL
            try:
                coredump_socket.send_ack(conn, coredump_socket.choose(request, mask))
            except (coredump_socket.ProtocolError, OSError) as exc:
                broken = f"coredump socket: {exc}"
        if broken is not None:
            ctx.errors.append(f"{broken}; no core")
            reason = broken
        if reason is not None:
            ctx.refused = reason
            conn.close()
            _null_stdin()
            early.eof = early.released = True
            args.signal = self.info.signal if self.info.signal is not None else _rejected_signal(early.proc,
                                                                                               self.pidfd)
            return
        _grow_receive_buffer(conn)
        ctx.shared_cpu = affinity.for_crash(args.tid, self.info.pid, self.pidfd)
        os.dup2(conn.fileno(), capture.STDIN, inheritable=False)
        conn.close()
        capture.take_core(early, capture.STDIN, buffer=self.buffer)
        args.signal = elf.signal_number(early.core)


def _request(conn: socket.socket) -> Optional[coredump_socket.Request]:
    """The ``@@`` request; None under ``@`` (the core follows at once: its first bytes are ELF)."""
    head = conn.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
    if head == b"\x7fELF":
        return None
    return coredump_socket.read_request(conn)


def _hostname(pid: int, pidfd: int) -> Optional[str]:
    """The crashed process's hostname (%h): this worker joins its UTS namespace, which changes nothing
    else, and the name counts only if the pidfd still refers to that pid afterwards."""
    try:
        fd = procfs.open_namespace(pid, "uts")
    except OSError:
        return None
    try:
        libc.setns(fd, libc.CLONE_NEWUTS)
    except OSError:
        return None
    finally:
        os.close(fd)
    if procfs.pidfd_pid(pidfd) != pid:
        return None
    return os.uname().nodename


def _rejected_signal(proc: Optional[procfs.Proc], pidfd: int) -> Optional[int]:
    """A REJECTed crash's signal: from the /proc/<pid>/stat read before the ack (the pidfd guarded that read),
    else from its exit status."""
    found = procfs.dump_signal(proc.files.get("stat", b"")) if proc is not None else None
    return found if found is not None else _exit_signal(pidfd)


def _exit_signal(pidfd: int) -> Optional[int]:
    """After a REJECT the process dies at once: its signal from its exit status, if that comes in time."""
    deadline = time.monotonic() + EXIT_WAIT
    while time.monotonic() < deadline:
        try:
            status = coredump_socket.pidfd_exit(pidfd)
        except OSError:
            return None
        if status is not None:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        select.select([pidfd], [], [], 0.05)
    return None


def _null_stdin() -> None:
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, capture.STDIN, inheritable=False)
    os.close(null)


def _grow_receive_buffer(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 4 << 20)  # as root, past net.core.rmem_max
    except OSError:
        pass
