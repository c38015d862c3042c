"""``corepipe serve``'s accept loop: it accepts the kernel's coredump socket connections and the pipe handlers'
handoffs, queues them, hands each to a pre-forked worker (services/serve/worker.py) and reaps it.

At most ``workers`` crashes are collected at once; the rest wait, connected, in a queue, the kernel holding their
processes. Forked workers, not threads: the pipeline bounds itself with SIGALRM and holds process-wide state (its
rlimits, its fds), the parent has already imported everything (no interpreter start per crash), and a worker that
dies takes only its own crash with it. The loop is one thread (the metrics endpoint is a child of its own,
services/serve/metrics.py). Under systemd (corepipe.socket, LISTEN_FDS) the listening socket outlives a restart of
the service, so crashes that connect meanwhile wait in its backlog.
"""

from __future__ import annotations

import collections
import errno
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from corepipe.platform import config as configuration
from corepipe.platform import coredump_socket, forward, libc
from corepipe.platform.fs import unlink_if_present
from corepipe.platform.kernel import parse_args
from corepipe.platform.log import ERR, INFO, log
from corepipe.platform.sysctl import Sysctl
from corepipe.services import forwarded
from corepipe.services.serve import handoffs, metrics, pattern, watchdog, worker
from corepipe.services.serve import health as healthfile
from corepipe.services.serve.health import HEARTBEAT, RUN_DIR
from corepipe.services.serve.worker import FAST, LATE, NORMAL, RECORD_ONLY

#: The listen backlog; the kernel caps it at net.core.somaxconn (4096 by default).
BACKLOG = 4096
#: Connections held beyond this many waiting ones are answered REJECT (record only) instead of a core.
QUEUE_LIMIT = 512
#: How long a crash a pipe handler handed over may wait for a worker, the kernel holding the crashed process.
FORWARD_WAIT = 300.0
#: Where the kernel's crashes come from: the coredump socket and handlers' handoffs, or handoffs only.
SOCKET_MODE, PIPE_MODE = "socket", "pipe"


@dataclass
class Options:
    socket_path: str = coredump_socket.DEFAULT_SOCKET
    config: Optional[str] = None
    workers: int = 0  # 0: one per CPU, at least 2
    queue_limit: int = QUEUE_LIMIT
    backlog: int = BACKLOG
    run_dir: str = RUN_DIR
    #: The pattern to put back when the server stops (a pipe pattern); None: what was there at start.
    fallback: Optional[str] = None
    proc_sys: str = "/proc/sys"
    #: A process of the host's mount namespace, from which the pattern is written (see write_pattern).
    host_pid: int = 1
    #: SOCKET_MODE: the coredump socket's pattern, and handoffs; PIPE_MODE: the kernel's pipe pattern is left
    #: alone and the server collects what the handlers hand over (``<run_dir>/forward.sock``).
    mode: str = SOCKET_MODE
    forward_wait: float = FORWARD_WAIT


@dataclass
class Stats:
    """The server's counters, in its health file (and for a metrics endpoint)."""

    accepted: int = 0
    #: Crashes pipe handlers handed over, and handoffs refused (malformed, or the server saturated).
    forwarded: int = 0
    forward_refused: int = 0
    workers_started: int = 0
    worker_failures: int = 0
    workers_killed: int = 0  # by the watchdog (services/serve/watchdog.py)
    max_queue: int = 0
    #: Crashes collected at each load (NORMAL, FAST, RECORD_ONLY).
    degraded: dict = field(default_factory=dict)


def worker_count(requested: int) -> int:
    if requested > 0:
        return requested
    return max(2, len(os.sched_getaffinity(0)))


class Waiting:
    """A crash waiting for a worker: a kernel connection (``conn``) or a handler's handoff (``got``, with its
    journal entry), and when it was accepted (monotonic)."""

    def __init__(self, accepted: float, conn: Optional[socket.socket] = None,
                 got: Optional[forward.Forwarded] = None, journal: Optional[str] = None):
        self.accepted, self.conn, self.got, self.journal = accepted, conn, got, journal

    def fds(self) -> list:
        return [self.conn.fileno()] if self.conn is not None else self.got.fds()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        else:
            self.got.close()


class Server:
    """The accept loop and its workers; ``run`` returns the exit code."""

    def __init__(self, options: Options):
        self.options = options
        self.stats = Stats()
        self.workers = worker_count(options.workers)
        self.queue: collections.deque = collections.deque()
        #: Idle workers, (pid, socketpair end), and the pids of those collecting a crash.
        self.spares: collections.deque = collections.deque()
        self.busy: set = set()
        self.watchdog = watchdog.Watchdog(options.config, self.stats)
        #: The guardian (services/serve/pattern.py): its pid, and a pidfd of it (it is not our child).
        self.guardian: Optional[int] = None
        self.guardian_fd: Optional[int] = None
        #: The metrics process and the address it serves, when there is one.
        self.metrics: Optional[int] = None
        self.metrics_address: Optional[str] = None
        self.stopping = False
        self.sysctl = Sysctl(options.proc_sys)
        self.pattern: Optional[str] = None
        self.fallback: Optional[str] = options.fallback
        self.listener: Optional[socket.socket] = None
        #: Where pipe handlers hand crashes over (platform/forward.py).
        self.forward_listener: Optional[socket.socket] = None
        self.forward_path = forward.socket_path(options.run_dir)
        #: The listeners came from systemd (corepipe.socket, corepipe-forward.socket): theirs to remove.
        self.activated = self.forward_activated = False
        self.started = time.time()
        self.last_beat = 0.0
        self.poller = select.poll()
        #: Handlers' connections whose message or GO is still to come (services/serve/handoffs.py).
        self.handoffs = handoffs.Handoffs(self.poller, self._judge, self._note, self.stats)

    # -- start and stop -------------------------------------------------------------------------------

    def open(self) -> None:
        """The listening socket (systemd's, or our own) and the kernel's pattern pointing at it."""
        _raise_nofile()
        _preload()
        # before the listeners and the guardian: it holds none
        self.metrics, self.metrics_address = metrics.start(self.options.config, self.options.run_dir)
        forwarded.recover(self.options.run_dir, worker.Prepared(self.options.config).cfg,
                          "a previous server died", grace=0)
        activated = coredump_socket.activated_sockets()
        os.makedirs(self.options.run_dir, mode=0o755, exist_ok=True)
        self.forward_listener = activated.pop(socket.SOCK_SEQPACKET, None)
        self.forward_activated = self.forward_listener is not None
        if self.forward_activated:  # the socket unit's path, which systemd keeps open between restarts
            self.forward_path = self.forward_listener.getsockname()
        else:
            self.forward_listener = coredump_socket.listen(self.forward_path, self.options.backlog,
                                                           socket.SOCK_SEQPACKET)
        self.forward_listener.setblocking(False)
        if self.options.mode == PIPE_MODE:
            for unused in activated.values():  # corepipe.socket, enabled by an earlier socket-mode install
                unused.close()
            self.guardian, self.guardian_fd = pattern.start_guardian(self.sysctl, None, None, [self.forward_listener],
                                                                     **self._guardian_options())
            log(f"serve: pipe mode, taking crashes from the handlers on {self.forward_path}, {self.workers} workers")
            return
        self.listener = activated.pop(socket.SOCK_STREAM, None)
        self.activated = self.listener is not None
        if self.listener is None:
            os.makedirs(os.path.dirname(self.options.socket_path), mode=0o700, exist_ok=True)
            self.listener = coredump_socket.listen(self.options.socket_path, self.options.backlog)
        self.listener.setblocking(False)
        if self.activated:  # the socket unit's path, which systemd keeps open between restarts
            self.options.socket_path = self.listener.getsockname()
        self.pattern, self.fallback = pattern.take(self.sysctl, self.options.socket_path, self.fallback,
                                                   self.options.host_pid, self.options.run_dir)
        self.guardian, self.guardian_fd = pattern.start_guardian(
            self.sysctl, self.pattern, self.fallback, [self.listener, self.forward_listener],
            **self._guardian_options())
        log(f"serve: listening on {self.options.socket_path} and {self.forward_path}, kernel.core_pattern = "
            f"{self.pattern}, {self.workers} workers; on stop: {self.fallback!r}")

    def close(self, why: str) -> None:
        """Fallback pattern first (so no crash meets a closed socket), then the socket."""
        pattern.give_back(self.sysctl, self.pattern, self.fallback, self.options.host_pid, why, self.options.run_dir)
        self.stopping = True
        if self.forward_listener is not None and not self.forward_activated:  # handlers now collect themselves
            unlink_if_present(self.forward_path)
        self._accept_all()  # connected before the switch: still ours to collect
        while self.queue or self.busy or self.handoffs:
            self._queue_handoffs(self.handoffs.step_all() + self.handoffs.expire(time.monotonic()))
            if self.queue and not self.spares and len(self.busy) < self.workers:
                self._fork_spare()
            self._dispatch()
            self.busy.difference_update(self.watchdog.overdue())
            self._reap()  # not blocking: a hung worker is killed by the watchdog, not waited for
            time.sleep(0.05)
        for _pid, channel in self.spares:
            channel.close()  # an idle worker exits when its channel closes
        while self.spares:
            self._reap(block=True)
        if self.listener is not None:
            self.listener.close()
            if not self.activated:
                unlink_if_present(self.options.socket_path)
        if self.forward_listener is not None:
            self.forward_listener.close()
        if not self.forward_activated:
            unlink_if_present(self.forward_path)
        if self.guardian_fd is not None:
            pattern.stop_guardian(self.guardian_fd)
        if self.metrics is not None:
            os.kill(self.metrics, signal.SIGKILL)
            os.waitpid(self.metrics, 0)
        self.guardian = self.guardian_fd = self.metrics = None
        healthfile.remove_health(self.options.run_dir)

    def _guardian_options(self) -> dict:
        return {"run_dir": self.options.run_dir, "config": self.options.config, "host_pid": self.options.host_pid}

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        why = "stopped"
        try:
            self.open()
            for listener in (self.listener, self.forward_listener):
                if listener is not None:
                    self.poller.register(listener.fileno(), select.POLLIN)
            self.poller.register(wake_r, select.POLLIN)
            self._dispatch()  # the first idle workers
            while not self.stopping:
                self._heartbeat()
                ready = self.poller.poll(HEARTBEAT * 1000)
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._queue_handoffs([self.handoffs.step(fd) for fd, _ in ready])
                self._queue_handoffs(self.handoffs.expire(time.monotonic()))
                self._accept_all()
                self._reap()
                self.busy.difference_update(self.watchdog.overdue())  # their slots get new workers
                self._dispatch()
            return 0
        except BaseException as exc:
            why = f"fatal error {type(exc).__name__}: {exc}"
            log(f"error: serve: {why}", ERR)
            raise
        finally:
            self.close(why)
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _accept_all(self) -> None:
        for listener in (self.listener, self.forward_listener):
            while listener is not None:
                if listener is self.forward_listener and len(self.handoffs) >= self.options.queue_limit:
                    break  # the rest waits in the backlog (or its handler's deadline passes: it collects)
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        break  # the rest waits in the backlog until a worker frees fds
                    raise
                if listener is self.listener:
                    self.stats.accepted += 1
                    pid, uid, gid = coredump_socket.peer_credentials(conn)
                    journal = forwarded.note_peer(self.options.run_dir, pid, uid, gid)
                    self.queue.append(Waiting(time.monotonic(), conn=conn, journal=journal))
                    self.stats.max_queue = max(self.stats.max_queue, len(self.queue))
                else:
                    self._queue_handoffs([self.handoffs.add(conn)])
        if self.forward_listener is not None:  # at the limit its backlog must not wake the loop: it would spin
            self.poller.register(self.forward_listener.fileno(),
                                 select.POLLIN if len(self.handoffs) < self.options.queue_limit else 0)

    def _judge(self, got: forward.Forwarded) -> Optional[str]:
        """Why a well-formed handoff is not taken (the handler collects it), or None."""
        return ("the server is stopping" if self.stopping else
                "the server is saturated" if len(self.queue) >= self.options.queue_limit else
                None if self._ours(got.argv) else "the handler of another installation (its --config is not ours)")

    def _note(self, got: forward.Forwarded) -> Optional[str]:
        return forwarded.note(self.options.run_dir, got)

    def _queue_handoffs(self, taken: list) -> None:
        """Handoffs whose GO came (None: a step that finished none): the crashes are ours, queued like kernel
        connections."""
        for handoff in taken:
            if handoff is not None:
                self.stats.accepted += 1
                self.stats.forwarded += 1
                self.queue.append(Waiting(handoff.accepted, got=handoff.got, journal=handoff.journal))
        self.stats.max_queue = max(self.stats.max_queue, len(self.queue))

    def _dispatch(self) -> None:
        """Hand waiting crashes to idle workers, then fork idle ones up to ``workers`` in all."""
        while self.queue and self.spares:
            waiting = self.queue.popleft()
            load = self.load(waiting)
            pid, channel = self.spares.popleft()
            message = f"{waiting.accepted!r} {load}\n{waiting.journal or ''}"
            if waiting.got is not None:
                message += "\0" + "\0".join(waiting.got.argv)
            try:
                socket.send_fds(channel, [message.encode("utf-8", "surrogateescape")], waiting.fds())
            except OSError:  # that worker died idle: the crash waits for the next one
                self.queue.appendleft(waiting)
                continue
            finally:
                channel.close()
            self.watchdog.dispatched(pid, waiting.journal)
            waiting.close()
            self.busy.add(pid)
            self.stats.degraded[load] = self.stats.degraded.get(load, 0) + 1
        while not self.stopping and len(self.busy) + len(self.spares) < self.workers:
            self._fork_spare()

    def _ours(self, argv: list) -> bool:
        """The handoff comes from this server's installation: its handler's ``--config`` is the server's (a test's
        or another installation's handler collects its crashes itself, into its own store)."""
        theirs = parse_args(argv).config or configuration.DEFAULT_PATH
        ours = self.options.config or configuration.DEFAULT_PATH
        try:
            return theirs == ours or os.path.samefile(theirs, ours)
        except OSError:
            return False

    def load(self, waiting: Optional[Waiting] = None) -> str:
        """How the next crash is collected: a long queue gets a faster level, an overlong one records only, and
        so does a handed-over crash that waited longer than ``forward_wait``."""
        if waiting is not None and waiting.got is not None and \
                time.monotonic() - waiting.accepted > self.options.forward_wait:
            return LATE
        if len(self.queue) >= self.options.queue_limit:
            return RECORD_ONLY
        if len(self.queue) >= 2 * self.workers:
            return FAST
        return NORMAL

    def _fork_spare(self) -> None:
        """A worker forked ahead of the crash (the fork is not on the crash's path), waiting for its
        connection on a socketpair; it collects one crash and exits."""
        channel, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                channel.close()
                for sock in [self.listener, self.forward_listener] + [c for _, c in self.spares]:
                    if sock is not None:
                        sock.close()
                for waiting in self.queue:
                    waiting.close()
                self.handoffs.close_copies()
                code = worker.run(child_end, self.options.config, self.options.forward_wait)
            except BaseException as exc:  # noqa: BLE001 - a worker reports, it never unwinds into the loop
                log(f"error: serve worker: {type(exc).__name__}: {exc}", ERR)
            finally:
                os._exit(code)
        child_end.close()
        self.spares.append((pid, channel))
        self.stats.workers_started += 1

    def _reap(self, block: bool = False) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            block = False
            if pid == self.metrics:
                self.metrics = self.metrics_address = None
                log(f"error: serve: the metrics process ended ({os.waitstatus_to_exitcode(status)}); no metrics "
                    "are served until the server restarts", ERR)
                continue
            self.busy.discard(pid)
            for spare in [s for s in self.spares if s[0] == pid]:
                self.spares.remove(spare)
                spare[1].close()
            code = os.waitstatus_to_exitcode(status)
            self.watchdog.ended(pid, code, usage)
            if code not in (0, 1, 2):
                self.stats.worker_failures += 1
                log(f"error: serve: worker {pid} ended with {code}", ERR)

    def health(self) -> dict:
        return {"pid": os.getpid(), "started": self.started, "heartbeat": time.time(), "mode": self.options.mode,
                "socket": self.options.socket_path if self.options.mode == SOCKET_MODE else None,
                "forward_socket": self.forward_path, "pattern": self.pattern, "fallback": self.fallback,
                "activated": self.activated, "forward_activated": self.forward_activated,
                "guardian": self.guardian, "metrics": self.metrics,
                "metrics_address": self.metrics_address, "workers": self.workers,
                "busy": len(self.busy), "idle": len(self.spares), "queued": len(self.queue),
                "stats": self.stats.__dict__}

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_beat < HEARTBEAT:
            return
        self.last_beat = now
        try:
            healthfile.write_health(self.options.run_dir, self.health())
        except OSError as exc:
            log(f"error: serve: cannot write the health file: {exc}", ERR)


def _raise_nofile() -> None:
    """Queued connections are fds: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _preload() -> None:
    """Import in the parent what every worker needs, so a fork starts warm."""
    from corepipe.domain import backtrace, binaries  # noqa: F401
    from corepipe.platform import compress

    compress.compressor()
    configuration.parse("", "<preload>")
    libc.load()


def serve(options: Options) -> int:
    log_line = f"serve: starting (pid {os.getpid()})"
    log(log_line, INFO)
    return Server(options).run()
