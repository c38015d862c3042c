"""``corepipe serve``: the resident collector behind ``core_pattern = @@/run/corepipe/coredump.socket``.

The kernel connects for every crash (platform/coredump_socket.py). The accept loop only accepts:
each connection is handed to a forked worker (at most ``workers`` at once; the rest wait, connected,
in a queue, the kernel holding their processes) and the worker runs the very pipeline of ``corepipe
collect`` (services/collect.py), with the socket where the kernel's pipe would be, so socket and pipe
mode write the same records. Forked workers, not threads: the pipeline bounds itself with SIGALRM
and holds process-wide state (its rlimits, its fds), the parent has already imported everything
(no interpreter start per crash), and a worker that dies takes only its own crash with it.

Before the dump a worker decides (``decide``): RLIMIT_CORE 0 (from /proc/<pid>/limits: the kernel
applies none to sockets), excluded by the config, over a rate limit, no room in the store even after
the policy's deletions (max_use, keep_free), or the server saturated -> REJECT, so the kernel writes
no byte of memory; the crash still gets its record, with the reason. Otherwise KERNEL + WAIT: the
kernel holds the task until the worker has read what it needs from /proc and the core is stored.

Never a silent window: the server writes the socket pattern on start and the fallback (the installed
pipe handler) on stop or on a fatal error; a guardian process it forks first puts the fallback back
if the server is killed. Under systemd (corepipe.socket, LISTEN_FDS) the listening socket outlives
a restart of the service, so crashes that connect meanwhile wait in its backlog.
``<run_dir>/serve.json`` is its health: pid, heartbeat, counts (``read_health``).

Its Prometheus endpoint (config ``metrics_listen``, loopback by default) is served by a child process of
its own (``_start_metrics``): the accept loop stays one thread (it forks workers, and a fork must not
copy another thread's locks) and a scrape, which walks the store, never delays a crash.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from corepipe.domain import accounting
from corepipe.domain.context import Context
from corepipe.platform import affinity, capture, coredump_socket, elf, forward, libc, memread, procfs
from corepipe.platform import config as configuration
from corepipe.platform.fs import unlink_if_present
from corepipe.platform.kernel import RLIM_INFINITY, KernelArgs, parse_args
from corepipe.platform.log import ERR, INFO, WARNING, log
from corepipe.platform.store import Store
from corepipe.platform.sysctl import CORE_PATTERN, Sysctl, SysctlError
from corepipe.services import collect, forwarded
from corepipe.services.install import DEFAULT_SOCKET

RUN_DIR = "/run/corepipe"
HEALTH = "serve.json"
#: A heartbeat older than this many seconds means the server is stuck (``status`` says so).
HEARTBEAT = 2.0
STALE = 15.0
#: The listen backlog; the kernel caps it at net.core.somaxconn (4096 by default).
BACKLOG = 4096
#: Connections held beyond this many waiting ones are answered REJECT (record only) instead of a core.
QUEUE_LIMIT = 512
#: How long a worker waits after a REJECT for the process's exit status (its signal) when neither the pidfd
#: (PIDFD_INFO_COREDUMP_SIGNAL) nor /proc/<pid>/stat told it; the status comes only once the process is reaped,
#: and a worker waiting is a worker a storm does not have.
EXIT_WAIT = 1.0
SD_LISTEN_FDS_START = 3
_SO_RCVBUFFORCE = 33
#: How loaded the server is when a crash's turn comes: NORMAL, FAST (compression level 1) or RECORD_ONLY; LATE:
#: a handed-over crash waited longer than ``forward_wait`` for a worker (record only).
NORMAL, FAST, RECORD_ONLY, LATE = "normal", "fast", "record-only", "late"
#: How long a crash a pipe handler handed over may wait for a worker, the kernel holding the crashed process.
FORWARD_WAIT = 300.0
#: How long the accept loop gives a handler to send its handoff and its GO (platform/forward.py).
HANDOFF_SECONDS = 0.5
#: Where the kernel's crashes come from: the coredump socket and handlers' handoffs, or handoffs only.
SOCKET_MODE, PIPE_MODE = "socket", "pipe"


@dataclass
class Options:
    socket_path: str = DEFAULT_SOCKET
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
    max_queue: int = 0
    #: Crashes collected at each load (NORMAL, FAST, RECORD_ONLY).
    degraded: dict = field(default_factory=dict)


def worker_count(requested: int) -> int:
    if requested > 0:
        return requested
    return max(2, len(os.sched_getaffinity(0)))


def activated_sockets() -> dict:
    """The listening sockets systemd passed (LISTEN_FDS: corepipe.socket's stream socket for the kernel,
    corepipe-forward.socket's seqpacket one for the handlers), by type; empty without socket activation."""
    count = os.environ.get("LISTEN_FDS", "")
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or count not in ("1", "2"):
        return {}
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    found = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        found[sock.type] = sock
    return found


def read_health(run_dir: str = RUN_DIR) -> Optional[dict]:
    """The running server's health file with ``alive`` (its pid is a corepipe serve) and ``fresh``
    (heartbeat within STALE seconds); None when there is none."""
    try:
        with open(os.path.join(run_dir, HEALTH), "rb") as f:
            health = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(health, dict):
        return None
    try:
        alive = b"serve" in procfs.read(int(health.get("pid", 0)), "cmdline")
    except (OSError, ValueError, TypeError):
        alive = False
    health["alive"] = alive
    health["fresh"] = alive and time.time() - float(health.get("heartbeat") or 0) < STALE
    return health


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
        self.guardian: Optional[int] = None
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

    # -- start and stop -------------------------------------------------------------------------------

    def open(self) -> None:
        """The listening socket (systemd's, or our own) and the kernel's pattern pointing at it."""
        _raise_nofile()
        _preload()
        self._start_metrics()  # before the listeners and the guardian: it holds none
        forwarded.recover(self.options.run_dir, Prepared(self.options.config).cfg,
                          "a previous server died", grace=0)
        activated = activated_sockets()
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
            self.guardian = _start_guardian(self.sysctl, None, None, [self.forward_listener], self.options)
            log(f"serve: pipe mode, taking crashes from the handlers on {self.forward_path}, {self.workers} workers")
            return
        self.listener = activated.pop(socket.SOCK_STREAM, None)
        self.activated = self.listener is not None
        if self.listener is None:
            os.makedirs(os.path.dirname(self.options.socket_path), mode=0o700, exist_ok=True)
            self.listener = coredump_socket.listen(self.options.socket_path, self.options.backlog)
        self.listener.setblocking(False)
        modes = coredump_socket.core_modes(self.options.proc_sys)
        if "socket" not in modes:
            raise SysctlError(f"this kernel has no coredump socket mode (kernel.core_modes: {' '.join(modes) or '-'}); "
                              "use 'corepipe install --mode pipe'")
        if self.activated:  # the socket unit's path, which systemd keeps open between restarts
            self.options.socket_path = self.listener.getsockname()
        previous = self.sysctl.read(CORE_PATTERN)
        if self.fallback is None and not previous.startswith("@"):
            self.fallback = previous
        self.pattern = _set_socket_pattern(self.sysctl, self.options.socket_path, self.options.host_pid)
        self.guardian = _start_guardian(self.sysctl, self.pattern, self.fallback,
                                        [self.listener, self.forward_listener], self.options)
        log(f"serve: listening on {self.options.socket_path} and {self.forward_path}, kernel.core_pattern = "
            f"{self.pattern}, {self.workers} workers; on stop: {self.fallback!r}")

    def close(self, why: str) -> None:
        """Fallback pattern first (so no crash meets a closed socket), then the socket."""
        if self.pattern is not None and self.fallback is not None:
            try:
                if self.sysctl.read(CORE_PATTERN) == self.pattern:
                    write_pattern(self.sysctl, self.fallback, self.options.host_pid)
                    log(f"serve: {why}; kernel.core_pattern set back to {self.fallback!r}", WARNING)
            except SysctlError as exc:
                log(f"error: serve: {why}; cannot put back kernel.core_pattern: {exc}", ERR)
        self.stopping = True
        if self.forward_listener is not None and not self.forward_activated:  # handlers now collect themselves
            try:
                os.unlink(self.forward_path)
            except FileNotFoundError:
                pass
        self._accept_all()  # connected before the switch: still ours to collect
        while self.queue or self.busy:
            if self.queue and not self.spares and len(self.busy) < self.workers:
                self._fork_spare()
            self._dispatch()
            self._reap(block=True)
        for _pid, channel in self.spares:
            channel.close()  # an idle worker exits when its channel closes
        while self.spares:
            self._reap(block=True)
        if self.listener is not None:
            self.listener.close()
            if not self.activated:
                try:
                    os.unlink(self.options.socket_path)
                except FileNotFoundError:
                    pass
        if self.forward_listener is not None:
            self.forward_listener.close()
        if not self.forward_activated:
            try:
                os.unlink(self.forward_path)
            except FileNotFoundError:
                pass
        for pid in (self.guardian, self.metrics):
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self.guardian = self.metrics = None
        try:
            os.unlink(os.path.join(self.options.run_dir, HEALTH))
        except FileNotFoundError:
            pass

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
            poller = select.poll()
            for listener in (self.listener, self.forward_listener):
                if listener is not None:
                    poller.register(listener.fileno(), select.POLLIN)
            poller.register(wake_r, select.POLLIN)
            self._dispatch()  # the first idle workers
            while not self.stopping:
                self._heartbeat()
                poller.poll(HEARTBEAT * 1000)
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._accept_all()
                self._reap()
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
                else:
                    with conn:
                        self._take_handoff(conn)
                self.stats.max_queue = max(self.stats.max_queue, len(self.queue))

    def _take_handoff(self, conn: socket.socket) -> None:
        """A pipe handler's crash (platform/forward.py), journalled and queued like a kernel connection; when
        it is malformed or the server saturated, the handler is told to collect it itself."""
        conn.settimeout(HANDOFF_SECONDS)
        try:
            got = forward.receive(conn)
        except forward.Probe:
            return
        except (forward.ForwardError, OSError) as exc:
            self.stats.forward_refused += 1
            log(f"error: serve: a handoff on {self.forward_path} refused: {exc}", ERR)
            forward.refuse(conn, str(exc))
            return
        why = ("the server is stopping" if self.stopping else
               "the server is saturated" if len(self.queue) >= self.options.queue_limit else
               None if self._ours(got.argv) else "the handler of another installation (its --config is not ours)")
        if why is not None:
            self.stats.forward_refused += 1
            got.close()
            forward.refuse(conn, why)
            return
        journal = forwarded.note(self.options.run_dir, got)
        if not forward.take(conn):  # the handler gave up waiting: it collects the crash, not us
            unlink_if_present(journal)
            got.close()
            return
        self.stats.accepted += 1
        self.stats.forwarded += 1
        self.queue.append(Waiting(time.monotonic(), got=got, journal=journal))

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
                code = _worker(child_end, self.options)
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
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            block = False
            if pid == self.guardian:
                self.guardian = None
                continue
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

    def _start_metrics(self) -> None:
        """Fork the metrics process (config ``metrics_listen``) and wait until it listens or says why not. A
        missing prometheus-client or a port in use is logged, never fatal: collecting crashes comes first."""
        cfg = Prepared(self.options.config).cfg
        if not cfg.metrics_listen:
            return
        try:
            from corepipe.services import metrics  # noqa: F401 - here, to say at start that it is missing
        except ImportError as exc:
            from corepipe.platform import extras

            log(f"error: serve: no metrics endpoint: it needs {extras.missing('metrics', str(exc.name))} "
                "(or set metrics_listen = \"\")", ERR)
            return
        host, port = configuration.listen_address(cfg.metrics_listen)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                code = _metrics_process(host, port, self.options, parent, ready_w)
            except BaseException as exc:  # noqa: BLE001 - a child reports, it never unwinds into the loop
                log(f"error: serve metrics: {type(exc).__name__}: {exc}", ERR)
            finally:
                os._exit(code)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            answer = ready.read(4096).decode("utf-8", "replace")
        if not answer.startswith("port "):
            os.waitpid(pid, 0)
            log(f"error: serve: no metrics endpoint: {answer or 'the metrics process died'}", ERR)
            return
        self.metrics, self.metrics_address = pid, configuration.join_address(host, int(answer.split()[1]))
        if not configuration.is_loopback(host):
            log(f"serve: metrics on {host}, not loopback: anyone who reaches it sees container names and images",
                WARNING)
        log(f"serve: metrics on http://{self.metrics_address}/metrics (pid {pid})", INFO)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_beat < HEARTBEAT:
            return
        self.last_beat = now
        try:
            os.makedirs(self.options.run_dir, mode=0o755, exist_ok=True)
            path = os.path.join(self.options.run_dir, HEALTH)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.health(), f)
            os.rename(tmp, path)
        except OSError as exc:
            log(f"error: serve: cannot write the health file: {exc}", ERR)


def _metrics_process(host: str, port: int, options: Options, parent: int, ready: int) -> int:
    """The metrics process: the metrics endpoint (its event loop's thread is this process's own), the store's
    metrics under the config as the file is now, and the server's counters from its health file. It ends
    with the server (SIGKILL on the parent's death, whatever kills it)."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        return 1
    from corepipe.services import metrics

    prepared = Prepared(options.config)
    try:
        _server, thread, port = metrics.listen(host, port, lambda: prepared.current()[0],
                                               [metrics.ServerCollector(lambda: read_health(options.run_dir))])
    except OSError as exc:
        os.write(ready, f"cannot listen on {host}:{port}: {exc.strerror or exc}; set metrics_listen to a free "
                        "[HOST:]PORT, or \"\" for none".encode())
        return 1
    os.write(ready, f"port {port}".encode())
    os.close(ready)
    thread.join()
    return 0


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


def write_pattern(sysctl: Sysctl, value: str, host_pid: int = 1) -> None:
    """kernel.core_pattern = ``value``, written from the host's mount namespace (``host_pid``'s, the node's
    init by default): the kernel takes a socket pattern only from there (EIO from any other), and a server
    in a pod (hostPID) or in systemd's sandbox has mounts of its own. A forked child joins the host's mounts
    for the write (setns needs a single thread); the value is read back here."""
    try:
        same = procfs.namespace(host_pid, "mnt") == procfs.namespace("self", "mnt")
    except OSError:
        same = True  # not ours to join (or no such process): write from here, the read-back tells
    if same:
        sysctl.write(CORE_PATTERN, value)
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            libc.setns(procfs.open_namespace(host_pid, "mnt"), libc.CLONE_NEWNS)
            sysctl.write(CORE_PATTERN, value)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent reads the value back and reports
            pass
        finally:
            os._exit(code)
    os.waitpid(pid, 0)
    kept = sysctl.read(CORE_PATTERN)
    if kept != value:
        raise SysctlError(f"kernel.core_pattern = {value!r} could not be written from the mount namespace of pid "
                          f"{host_pid} (it is {kept!r}); run the server with the host's PID namespace (hostPID)")


def _set_socket_pattern(sysctl: Sysctl, path: str, host_pid: int) -> str:
    """``@@path`` where the kernel takes it (6.17), else ``@path``; read back either way."""
    for ack in (True, False):
        value = coredump_socket.pattern(path, ack=ack)
        try:
            write_pattern(sysctl, value, host_pid)
            return value
        except SysctlError:
            continue
    raise SysctlError(f"the kernel took neither @@{path} nor @{path} as kernel.core_pattern")


def _start_guardian(sysctl: Sysctl, pattern: Optional[str], fallback: Optional[str], listeners: list,
                    options: Options) -> Optional[int]:
    """A child that outlives a killed server just long enough to put the fallback pattern back (when there is
    one) and to record the handed-over crashes it held that no worker had (forwarded.recover)."""
    parent = os.getpid()
    parent_fd = os.pidfd_open(parent)
    pid = os.fork()
    if pid != 0:
        os.close(parent_fd)
        return pid
    code = 0
    try:
        for listener in listeners:  # a dead server's sockets must refuse at once, not queue crashes nobody accepts
            listener.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGINT):  # systemd signals what is left once the server is gone
            signal.signal(signum, signal.SIG_IGN)
        select.select([parent_fd], [], [])
        if pattern is not None and fallback is not None and sysctl.read(CORE_PATTERN) == pattern:
            write_pattern(sysctl, fallback, options.host_pid)
            log(f"error: serve (pid {parent}) is gone; kernel.core_pattern set back to {fallback!r}", ERR)
        forwarded.recover(options.run_dir, Prepared(options.config).cfg, f"the server (pid {parent}) died")
    except BaseException as exc:  # noqa: BLE001
        log(f"error: serve guardian: {type(exc).__name__}: {exc}", ERR)
        code = 1
    finally:
        os._exit(code)


# -- one crash, in a worker ---------------------------------------------------------------------------


SATURATED = "the collector was saturated (too many crashes waiting): record only"


@dataclass
class Decision:
    mask: int
    reason: Optional[str] = None


def decide(ctx: Context, load: str) -> Decision:
    """KERNEL (+WAIT), or REJECT with the reason the record will give: the kernel then writes nothing."""
    if load == RECORD_ONLY:
        return Decision(coredump_socket.REJECT, SATURATED)
    limit = ctx.args.core_limit_bytes() if ctx.cfg.honour_core_limit else None
    if limit == 0:
        return Decision(coredump_socket.REJECT, "RLIMIT_CORE is 0")
    reason = collect.excluded(ctx)
    if reason is not None:
        return Decision(coredump_socket.REJECT, reason)
    snap = ctx.snapshot
    if snap is None or not snap.trusted:
        return Decision(coredump_socket.KERNEL)
    try:
        with Store(ctx.cfg.store) as store:
            reason = accounting.refusal(store, ctx.cfg, group=ctx.group,
                                        exe=snap.exe or ctx.args.comm or "")
    except OSError as exc:
        log(f"error: pid {ctx.args.pid}: rate limits and room not checked before the dump: {exc}", ERR)
        reason = None
    return Decision(coredump_socket.REJECT if reason else coredump_socket.KERNEL, reason)


class Prepared:
    """What an idle worker readies before its crash comes: the config, loaded again only if its file changed."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.stamp = self._stamp()
        self.errors: list = []
        self.cfg = collect.load_config(path, self.errors)

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
            self.cfg = collect.load_config(self.path, self.errors)
        return self.cfg, list(self.errors)


def _worker(channel: socket.socket, options: Options) -> int:
    """An idle worker: ready the config, the /proc memory reader and the core's prefix buffer, wait for one
    crash from the accept loop (a kernel connection, or a handler's handoff), collect it."""
    prepared = Prepared(options.config)
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
                   LATE: f"the crash waited more than {options.forward_wait:g} s for a worker (serve "
                         "--forward-wait): record only"}.get(load)
        return forwarded.handle(got, journal or None, cfg, problems, float(accepted), refused, reader, buffer)
    finally:
        reader.close()


def handle(conn: socket.socket, prepared: Prepared, accepted: float, load: str,
           reader: Optional[memread.MemoryReader] = None, buffer: Optional[memoryview] = None,
           journal: Optional[str] = None) -> int:
    """One kernel connection: check the peer, read /proc, decide, ack, then ``collect``'s pipeline on the
    socket; the exit code ``corepipe collect`` would give. ``journal``: the accept loop's entry of this crash,
    removed once it has a record."""
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
    broken: Optional[str] = None  # the exchange with the kernel failed: a record without a core says why
    try:
        request = _request(conn)
    except (coredump_socket.ProtocolError, OSError) as exc:
        request, broken = None, f"coredump socket: {exc}"
    args = kernel_args(info, early.proc, when=int(time.time()), hostname=_hostname(info.pid, pidfd),
                       config=prepared.path)
    cfg, problems = prepared.current()
    errors += problems
    if load == FAST:
        cfg = dataclasses.replace(cfg, compression_level=1)
    signal.signal(signal.SIGALRM, capture.on_alarm)
    signal.alarm(cfg.timeout)
    ctx = Context(args=args, early=early, core_fd=capture.STDIN, cfg=cfg, errors=errors, transport="socket",
                  journal=journal)
    ctx.snapshot = collect.take_snapshot(ctx)
    ctx.container = collect.identify(ctx)
    decision = decide(ctx, load) if request is not None else Decision(coredump_socket.KERNEL)
    if request is not None:
        try:
            coredump_socket.send_ack(conn, coredump_socket.choose(request, decision.mask))
        except (coredump_socket.ProtocolError, OSError) as exc:
            broken = f"coredump socket: {exc}"
    if broken is not None:
        errors.append(f"{broken}; no core")
        decision = Decision(coredump_socket.REJECT, broken)
    if decision.mask == coredump_socket.REJECT:
        conn.close()
        _null_stdin()
        early.eof = early.released = True
        args.signal = info.signal if info.signal is not None else _rejected_signal(early.proc, pidfd)
        ctx.refused = decision.reason
    else:
        _grow_receive_buffer(conn)
        ctx.shared_cpu = affinity.for_crash(args.tid, info.pid, pidfd)
        os.dup2(conn.fileno(), capture.STDIN, inheritable=False)
        conn.close()
        capture.take_core(early, capture.STDIN, buffer=buffer)
        args.signal = elf.signal_number(early.core)
    return collect.run_context(ctx)


def kernel_args(info: coredump_socket.PidfdInfo, proc: Optional[procfs.Proc], *, when: int,
                hostname: Optional[str], config: Optional[str]) -> KernelArgs:
    """What the kernel's ``%P %p %I %u %g %t %c %d %F %h %e`` would have said, from the pidfd and /proc
    (the signal comes later, from the core or the exit status)."""
    files = proc.files if proc is not None else {}
    nspid = proc.status().get("NSpid", "").split() if proc is not None else []
    comm = files.get("comm", b"").decode("utf-8", "replace").rstrip("\n")
    return KernelArgs(pid=info.pid, ns_pid=int(nspid[-1]) if nspid and nspid[-1].isdigit() else None,
                      tid=procfs.dumping_thread(info.pid), uid=info.ruid, gid=info.rgid, time=when,
                      core_limit=procfs.core_limit(files.get("limits", b""), RLIM_INFINITY),
                      dump_mode=2 if info.coredump_mask & coredump_socket.PIDFD_COREDUMP_ROOT else 1,
                      pidfd=proc.pidfd if proc is not None else None, hostname=hostname, comm=comm or None,
                      config=config)


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


def serve(options: Options) -> int:
    log_line = f"serve: starting (pid {os.getpid()})"
    log(log_line, INFO)
    return Server(options).run()
