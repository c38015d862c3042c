"""Shared test helpers: strict skips, the kernel handler under a lock, the crasher, reading the store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest

from corepipe.platform import launcher

HERE = Path(__file__).resolve().parent
STRICT = os.environ.get("COREPIPE_TEST_STRICT") == "1"
LOCK_PATH = "/run/lock/corepipe-tests.lock"
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
PIPE_LIMIT = Path("/proc/sys/kernel/core_pipe_limit")
CRASH_LINE = next(i for i, line in enumerate((HERE / "crasher.c").read_text().splitlines(), 1)
                  if "CRASH HERE" in line)


def need(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false; under COREPIPE_TEST_STRICT=1 (CI) fail instead."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"COREPIPE_TEST_STRICT=1 and a requirement is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root_kernel() -> None:
    need(os.geteuid() == 0, "needs root to set kernel.core_pattern")
    need(os.access(CORE_PATTERN, os.W_OK), "/proc/sys/kernel/core_pattern is not writable here")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"needs {name} on PATH")
    return path


class Handler:
    """corepipe installed as the kernel's core_pattern for the duration of a test."""

    def __init__(self, workdir: Path, config_extra: str = "", forward: Optional[Path] = None):
        """``forward``: the server socket the handler hands crashes to (default: one in ``workdir``)."""
        self.workdir = workdir
        self.store = workdir / "store"
        self.config = workdir / "c.toml"
        self.launcher = workdir / "h"
        #: A server's run directory: its health file and the socket the handler hands crashes to (none runs
        #: unless a test starts one: a real installation's server never gets a test's crash).
        self.run_dir = workdir / "run"
        self.forward_socket = forward or self.run_dir / "forward.sock"
        self.config.write_text(f'store = "{self.store}"\n{config_extra}')
        self.launcher.write_text(launcher.script(forward=str(self.forward_socket)))
        self.launcher.chmod(0o755)
        #: The KernelSettings block the handler is installed in (for other host changes' undo_on_abort).
        self.settings: Optional[KernelSettings] = None

    def pattern(self, pidfd: bool = True) -> str:
        from corepipe.platform.kernel import build_pattern

        return build_pattern(str(self.launcher), str(self.config), pidfd=pidfd)

    def records(self) -> list:
        """The records in the store now; one whose crash goes meanwhile (counted instead, deleted) is left out."""
        found = []
        for path in sorted(self.store.rglob("record.json")):
            try:
                found.append(json.loads(path.read_text()) | {"_dir": str(path.parent)})
            except FileNotFoundError:
                continue
        return found

    def wait_record(self, match: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """The completed record that ``match`` picks; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.records() if self.store.exists() else []:
                if rec.get("status") != "collecting" and match(rec):
                    return rec
            time.sleep(0.05)
        raise AssertionError(f"no matching record within {timeout}s; have {[r.get('pid') for r in self.records()]}")

    def pids(self) -> list:
        """The handlers of this launcher running now (``collect`` in their argv)."""
        launcher, pids = str(self.launcher).encode(), []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if launcher in argv and b"collect" in argv:
                    pids.append(int(entry.name))
        return pids

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no handler of this launcher runs: a record is complete before the handler's last
        bookkeeping (the group's core list, the ledger) is written."""
        wait_for(lambda: not self.pids(), timeout, f"no handler of {self.launcher} running")


def collect_by_hand(handler: Handler, pid: int, comm: str, pidfd: Optional[int] = None,
                    dump_time: Optional[int] = None) -> subprocess.Popen:
    """`corepipe collect` run as the kernel runs it (empty environment, cwd /), for a live process of ours,
    reading the core from a pipe the test writes: for faults the kernel cannot be made to produce.
    ``dump_time``: the kernel's %t (default: now)."""
    when = int(time.time()) if dump_time is None else dump_time
    argv = [str(handler.launcher), "collect", "--config", str(handler.config), str(pid), str(pid), str(pid),
            str(os.getuid()), str(os.getgid()), "11", str(when), str(2**64 - 1), "1",
            "-" if pidfd is None else str(pidfd), "host", comm]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={}, cwd="/", pass_fds=() if pidfd is None else (pidfd,))


#: The watchdog of AbortGuard: reads "undo" commands (JSON argv lines) and "done" from stdin; at EOF
#: without "done" (the test process was killed) it runs the undo commands, newest first, and restores the
#: kernel settings given as hex in argv, if any. It runs in a session of its own, so a kill of the test's
#: process group does not take it along, and it holds the settings lock (KernelSettings) until it is done.
_WATCHDOG = """
import json, subprocess, sys
undo = []
for line in sys.stdin:
    if line == "done\\n":
        sys.exit(0)
    undo.append(json.loads(line))
for argv in reversed(undo):
    subprocess.run(argv, check=False, capture_output=True)
if len(sys.argv) == 3:
    pattern, limit = (bytes.fromhex(x) for x in sys.argv[1:3])
    open("/proc/sys/kernel/core_pattern", "wb").write(pattern)
    open("/proc/sys/kernel/core_pipe_limit", "wb").write(limit)
"""


#: A process that runs pytest while holding the settings lock itself (a test that runs part of the suite inside
#: a block of its own) names the lock's inherited file descriptor here: the child's blocks use it without
#: locking or unlocking it.
LOCK_FD_ENV = "COREPIPE_TEST_LOCK_FD"
#: The kernel's defaults: every KernelSettings block starts from them, so an installation of corepipe on the
#: host (whose pattern install would refuse to replace) is set aside for the block and given back after it.
START_PATTERN, START_LIMIT = b"core\n", b"0\n"


class AbortGuard:
    """Undoes host changes (mounts, forged runtime state) when the test process dies before ``close``: SIGKILL,
    a timeout's kill. The test's own cleanup covers every other exit."""

    def __init__(self, *settings: str, pass_fds: tuple = ()) -> None:
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *settings], stdin=subprocess.PIPE,
                                          text=True, pass_fds=pass_fds, start_new_session=True)

    def undo_on_abort(self, argv: list) -> None:
        """Run ``argv`` if the test process dies before ``close``."""
        self._watchdog.stdin.write(json.dumps(argv) + "\n")
        self._watchdog.stdin.flush()

    def close(self) -> None:
        self._watchdog.stdin.write("done\n")
        self._watchdog.stdin.close()
        self._watchdog.wait(timeout=30)


@contextlib.contextmanager
def settings_lock() -> Iterator:
    """The host-wide lock of the kernel settings (taken already if the parent process holds it for us)."""
    inherited = os.environ.get(LOCK_FD_ENV)
    if inherited:
        with os.fdopen(int(inherited), "w", closefd=False) as lock:
            yield lock
        return
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class KernelSettings:
    """Saves core_pattern and core_pipe_limit under a lock, sets the kernel's defaults (``start_pattern``,
    ``start_limit``) for the block, and restores the saved values whatever happens: on any exit of the block, and
    through a watchdog process when the test process dies without leaving it (SIGKILL, a timeout's kill). Other
    host changes register their undo command with ``undo_on_abort``."""

    start_pattern, start_limit = START_PATTERN, START_LIMIT

    def __enter__(self) -> KernelSettings:
        self._locked = settings_lock()
        self.lock = self._locked.__enter__()
        try:
            self.saved_pattern = CORE_PATTERN.read_bytes()
            self.saved_limit = PIPE_LIMIT.read_bytes()
            self._guard = AbortGuard(self.saved_pattern.hex(), self.saved_limit.hex(), pass_fds=(self.lock.fileno(),))
        except BaseException:
            self._locked.__exit__(*sys.exc_info())
            raise
        PIPE_LIMIT.write_bytes(self.start_limit)
        CORE_PATTERN.write_bytes(self.start_pattern)
        return self

    def set(self, pattern: str, pipe_limit: int = 64) -> None:
        PIPE_LIMIT.write_text(str(pipe_limit))
        CORE_PATTERN.write_text(pattern)
        assert CORE_PATTERN.read_text().rstrip("\n") == pattern, "the kernel did not take the pattern"

    def undo_on_abort(self, argv: list) -> None:
        """Run ``argv`` if the test process dies inside the block (the block's own cleanup covers the rest)."""
        self._guard.undo_on_abort(argv)

    def __exit__(self, *exc: object) -> None:
        try:
            CORE_PATTERN.write_bytes(self.saved_pattern)
            PIPE_LIMIT.write_bytes(self.saved_limit)
        finally:
            try:
                self._guard.close()
            finally:
                self._locked.__exit__(None, None, None)


@contextlib.contextmanager
def installed_handler(workdir: Path, config_extra: str = "", pipe_limit: int = 64) -> Iterator[Handler]:
    """Like the kernel_handler fixture, with extra config text and a chosen core_pipe_limit."""
    need_root_kernel()
    handler = Handler(workdir, config_extra=config_extra)
    with KernelSettings() as settings:
        settings.set(handler.pattern(), pipe_limit=pipe_limit)
        handler.settings = settings
        yield handler


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (for disk-full and quota tests), unmounted afterwards."""
    need(os.geteuid() == 0, "needs root to mount a tmpfs")
    path.mkdir(exist_ok=True)
    guard = AbortGuard()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    guard.undo_on_abort(["umount", "-l", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        guard.close()


@contextlib.contextmanager
def holding_slots(store: Path, kind: str, number: int) -> Iterator[None]:
    """Hold the ``number`` slots of ``kind`` (slots.CORE, slots.POSTMORTEM) of ``store`` until the block ends, as
    busy collectors would: a crash that needs one waits (slots.py)."""
    from corepipe.platform import slots

    fds = []
    try:
        for i in range(number):
            fd = os.open(store / slots.DIRECTORY / f"{kind}.{i}", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def short_tempdir() -> Path:
    """A short path: the whole core_pattern must fit in 127 bytes."""
    return Path(tempfile.mkdtemp(prefix="cpt-", dir="/tmp"))


def host_dir(store: Path) -> Path:
    """Where the host crashes of this test's own processes are filed: their system unit's directory
    (``host/<unit>``) or, outside one, their uid's (``uid/<uid>``)."""
    from corepipe.domain import containers

    group = containers.identify(Path("/proc/self/cgroup").read_text()).policy_group(os.getuid())
    return store.joinpath(*group)


def set_core_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (limit, limit))
    return apply


def crash(argv: list, core_limit: int = resource.RLIM_INFINITY, **kwargs) -> subprocess.CompletedProcess:
    """Run a program that crashes, with RLIMIT_CORE set; returns once the kernel has reaped it."""
    proc = subprocess.run(argv, preexec_fn=set_core_limit(core_limit), capture_output=True, timeout=120, **kwargs)
    return proc


def corepipe_cli(config: Path, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``corepipe --config CONFIG ARGS...`` from this checkout; with ``check``, it must exit 0."""
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def start_crash(argv: list, **kwargs) -> subprocess.Popen:
    """Like crash(), in the background: the test needs the PID or acts while the core is dumped."""
    return subprocess.Popen(argv, preexec_fn=set_core_limit(resource.RLIM_INFINITY), **kwargs)


#: Config text that turns the crash-loop rate limits off, for tests that crash the same program often.
NO_RATE_LIMIT = "rate_limit_container = 0\nrate_limit_exe = 0\n"


def cpus_allowed(status: Path) -> Optional[str]:
    """The ``Cpus_allowed_list`` of a /proc status file ("0-1", "1"), None once the task is gone."""
    try:
        text = status.read_text()
    except OSError:
        return None
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Cpus_allowed_list"))


def piped(data: bytes) -> int:
    """A pipe's read end holding ``data`` (at most the pipe's 1 MiB, as capture widens it), its write end closed."""
    from corepipe.platform import capture

    read_end, write_end = os.pipe()
    capture.widen_pipe(write_end)
    os.write(write_end, data)
    os.close(write_end)
    return read_end


def read_line(stream: object, timeout: float = 60.0) -> object:
    """The next line a child writes to its pipe ``stream``; fails after ``timeout`` (a child that never writes
    must not hang the test)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line from the child within {timeout}s"
    return stream.readline()


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """The first true value of ``predicate()``; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def recycle_pid(pid: int, argv: Optional[list] = None) -> subprocess.Popen:
    """A new process with ``pid`` (which must be free), made by steering the kernel's next PID: ``sleep 60``,
    its command line ``argv`` when given (as ``sleep`` with those arguments)."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(50):
        last.write_text(str(pid - 1))
        proc = subprocess.Popen(argv or ["sleep", "60"], executable=shutil.which("sleep"))
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.fail(f"could not recycle pid {pid}")


#: The kernel-log mark of the running test (tests/conftest.py writes one before each test that needs root).
_log_mark: Optional[str] = None


def mark_kernel_log(name: str) -> None:
    """Write a unique line to the kernel log: from now on ``dmesg_lines`` reads only what follows it, so a line of
    an earlier test's process that had the same PID never counts."""
    global _log_mark
    mark = f"corepipe-tests: mark {uuid.uuid4().hex} {name[-120:]}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(mark + "\n")
    _log_mark = mark


def dmesg_lines(needle: str) -> list:
    """The kernel log's lines holding ``needle``, after the running test's mark (all of them when the ring buffer
    has dropped the mark: what it kept is newer)."""
    lines = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    if _log_mark is not None:
        marked = [i for i, line in enumerate(lines) if _log_mark in line]
        lines = lines[marked[-1] + 1:] if marked else lines
    return [line for line in lines if needle in line]


def wait_log(needle: str) -> list:
    """The kernel log lines holding ``needle``, once there is one."""
    return wait_for(lambda: dmesg_lines(needle), 30, f"a log line with {needle!r}")


def core_digest(data: bytes) -> dict:
    """The ``core.digest`` a record states for a core of ``data``, computed here with xxhash itself."""
    import xxhash

    return {"algorithm": "xxh3-128", "value": xxhash.xxh3_128_hexdigest(data)}


def decompress(path: Path, out: Path) -> bytes:
    subprocess.run([need_tool("zstd"), "-q", "-d", "-f", str(path), "-o", str(out)], check=True)
    return out.read_bytes()


def gdb_backtrace(exe: str, core: Path, extra: Optional[list] = None) -> str:
    gdb = need_tool("gdb")
    proc = subprocess.run([gdb, "-batch", "-nx", *(extra or []), "-ex", "bt", exe, str(core)],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def installed_files(d: Path) -> list:
    """What ``corepipe install`` writes when pointed at the short temporary directory ``d``."""
    from corepipe.services import install

    return [f"{d}/b", f"{d}/corepipe-forward", f"{d}/c.toml", f"{d}/sd/{install.DROPIN_NAME}",
            f"{d}/{install.STATE_NAME}"]


#: install.sh enables systemd units (the prune timer; the socket in socket mode) only where systemd runs.
SYSTEMD_RUNS = os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None
SYSTEMD_DIR = "/etc/systemd/system"
UNIT_NAMES = ("corepipe-prune.timer", "corepipe-prune.service", "corepipe.socket", "corepipe-forward.socket",
              "corepipe.service", "corepipe-ship.service")


def units_dir(d: Path) -> str:
    """Where a test's install.sh writes its units: systemd's own directory where systemd runs and no installation
    has units there (a unit's name is host-wide), so that they are enabled as on a host; else ``d/units``, where
    install.sh writes them without enabling them."""
    if SYSTEMD_RUNS and not any(os.path.lexists(f"{SYSTEMD_DIR}/{name}") for name in UNIT_NAMES):
        return SYSTEMD_DIR
    return f"{d}/units"


def check_restored(settings: KernelSettings, d: Path, units: Optional[str] = None) -> None:
    """After uninstall: the kernel settings are back byte for byte as the block started, and nothing install wrote
    is left (the systemd units in ``units`` included)."""
    assert CORE_PATTERN.read_bytes() == settings.start_pattern
    assert PIPE_LIMIT.read_bytes() == settings.start_limit
    unit_files = [f"{units}/{name}" for name in UNIT_NAMES] if units else []
    assert not any(os.path.lexists(p) for p in installed_files(d) + unit_files)


#: Everything an installation made by install/install.sh with its defaults owns on the host: the tests must
#: leave it exactly as they found it (conftest.py checks it around the whole session).
REAL_INSTALLATION = ("/etc/corepipe", "/usr/local/bin/corepipe", "/usr/local/bin/corepipe-forward", "/var/lib/corepipe",
                     "/etc/sysctl.d/90-corepipe.conf", "/opt/corepipe",
                     "/usr/share/bash-completion/completions/corepipe",
                     "/usr/local/share/man/man1/corepipe.1", "/usr/local/share/man/man5/corepipe.toml.5",
                     *(f"{SYSTEMD_DIR}/{name}" for name in UNIT_NAMES))


def fingerprint(paths: Iterable[str], kernel: bool = True) -> dict:
    """Every file, directory and link at or below ``paths`` (links not followed) with its type, mode, owner, size,
    modification time and, for files up to 1 MiB, a digest of the content; with ``kernel``, the kernel's core
    settings too, read under the settings lock so that no test's own values are seen."""
    seen = {}

    def note(path: str) -> None:
        st = os.lstat(path)
        facts = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode) and st.st_size <= 1 << 20:  # bigger ones (cores): size and time suffice
            with open(path, "rb") as f:
                facts += (hashlib.file_digest(f, "sha256").hexdigest(),)
        elif stat.S_ISLNK(st.st_mode):
            facts += (os.readlink(path),)
        seen[path] = facts

    for top in paths:
        if not os.path.lexists(top):
            continue
        note(top)
        if os.path.isdir(top) and not os.path.islink(top):
            for root, dirs, files in os.walk(top):
                for name in dirs + files:
                    note(os.path.join(root, name))
    if not kernel:
        return seen
    with settings_lock():
        seen[str(CORE_PATTERN)] = CORE_PATTERN.read_bytes()
        seen[str(PIPE_LIMIT)] = PIPE_LIMIT.read_bytes()
    return seen


def changes(before: dict, after: dict) -> list:
    """What differs between two fingerprints, one line per path."""
    lines = []
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            lines.append(f"{path}: removed")
        elif path not in before:
            lines.append(f"{path}: created")
        elif before[path] != after[path]:
            lines.append(f"{path}: changed ({before[path]!r} -> {after[path]!r})")
    return lines


class Served(Handler):
    """``corepipe serve`` on a socket in ``workdir``, its pattern set by the server itself; the handler's
    pipe pattern is its fallback. Stopped (by PID) when the block ends; KernelSettings restores the rest."""

    def __init__(self, workdir: Path, config_extra: str = ""):
        if "metrics_listen" not in config_extra:  # any free port: servers of concurrent tests never collide
            config_extra = f'metrics_listen = "127.0.0.1:0"\n{config_extra}'
        super().__init__(workdir, config_extra=config_extra)
        self.socket = workdir / "s.sock"
        self.proc: Optional[subprocess.Popen] = None
        #: "socket": the server takes the coredump socket; "pipe": the handler's pattern stays, it hands over.
        self.mode = "socket"

    def start(self, *extra: str, prefix: tuple = ()) -> subprocess.Popen:
        """``prefix``: a command the server runs under (e.g. ``unshare --mount``, as in a pod)."""
        def ready() -> bool:
            if not (self.run_dir / "serve.json").exists():
                return False
            return self.mode == "pipe" or CORE_PATTERN.read_text().startswith("@")

        self.proc = subprocess.Popen([*prefix, str(self.launcher), "serve", "--config", str(self.config), "--socket",
                                      str(self.socket), "--run-dir", str(self.run_dir), "--fallback", self.pattern(),
                                      "--mode", self.mode, *extra], env={}, cwd="/", stdout=subprocess.DEVNULL,
                                     stderr=(self.workdir / "serve.err").open("a"))
        wait_for(lambda: ready() or self.proc.poll() is not None, 30, "the server to start")
        assert self.proc.poll() is None, (self.workdir / "serve.err").read_text()
        return self.proc

    def health(self) -> dict:
        return json.loads((self.run_dir / "serve.json").read_text())

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(60)


@contextlib.contextmanager
def served_handler(workdir: Path, config_extra: str = "", pipe_limit: int = 64, mode: str = "socket",
                   extra: tuple = ()) -> Iterator[Served]:
    """The twin of installed_handler with a running ``corepipe serve``: in socket mode the kernel streams cores
    to it, in pipe mode the kernel's handler hands them over (``extra``: more serve options)."""
    need_root_kernel()
    if mode == "socket":
        need("socket" in Path("/proc/sys/kernel/core_modes").read_text().split()
             if Path("/proc/sys/kernel/core_modes").exists() else False,
             "needs a kernel with coredump socket mode (6.16+)")
    served = Served(workdir, config_extra=config_extra)
    served.mode = mode
    with KernelSettings() as settings:
        settings.set(served.pattern(), pipe_limit=pipe_limit)
        served.settings = settings
        try:
            proc = served.start(*extra)
            # Should this process die inside: stop the server and wait until it and its guardian (which would
            # put the fallback pattern back) are gone, before the watchdog restores the kernel settings.
            settings.undo_on_abort(["sh", "-c", f"kill -TERM {proc.pid}; for _ in $(seq 600); do pgrep -f -- "
                                    f"'--socke[t] {served.socket} ' >/dev/null || break; sleep 0.1; done"])
            yield served
        finally:
            served.stop()


#: How the kernel logs a dump it dropped without a handler ("coredump: PID(COMM): over core_pipe_limit,
#: skipping core dump"; socket mode's failures the same way).
DROPPED_DUMP = re.compile(r"\] coredump: \d+\((?P<comm>[^)]*)\): ")


def kernel_log_time(line: str) -> float:
    """The timestamp of a dmesg line ("[ 1234.567890] ...")."""
    return float(line[1:line.index("]")])


def kernel_log_now() -> float:
    """The kernel log's latest timestamp: a mark to look for lines after."""
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()
    return kernel_log_time(lines[-1]) if lines else 0.0


def dropped_dumps(since: float, comms: set) -> list:
    """The kernel's lines about dumps of ``comms`` it dropped after ``since`` (by timestamp: the ring
    buffer drops old lines, so counts before and after do not compare)."""
    return [line for line in dmesg_lines("coredump: ") if kernel_log_time(line) > since
            and (match := DROPPED_DUMP.search(line)) and match.group("comm") in comms]
