"""Shared test helpers: strict skips, the kernel handler under a lock, the crasher, reading the store."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
        return [json.loads(p.read_text()) | {"_dir": str(p.parent)} for p in sorted(self.store.rglob("record.json"))]

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


def collect_by_hand(handler: Handler, pid: int, comm: str, pidfd: Optional[int] = None) -> subprocess.Popen:
    """`corepipe collect` run as the kernel runs it (empty environment, cwd /), for a live process of ours,
    reading the core from a pipe the test writes: for faults the kernel cannot be made to produce."""
    argv = [str(handler.launcher), "collect", "--config", str(handler.config), str(pid), str(pid), str(pid),
            str(os.getuid()), str(os.getgid()), "11", str(int(time.time())), str(2**64 - 1), "1",
            "-" if pidfd is None else str(pidfd), "host", comm]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={}, cwd="/", pass_fds=() if pidfd is None else (pidfd,))


#: The watchdog of KernelSettings: reads "undo" commands (JSON argv lines) and "done" from stdin; at EOF
#: without "done" (the test process was killed) it runs the undo commands, newest first, and restores the
#: kernel settings given as hex in argv. It runs in a session of its own, so a kill of the test's process
#: group does not take it along, and it holds the settings lock until it has restored them.
_WATCHDOG = """
import json, subprocess, sys
pattern, limit = (bytes.fromhex(x) for x in sys.argv[1:3])
undo = []
for line in sys.stdin:
    if line == "done\\n":
        sys.exit(0)
    undo.append(json.loads(line))
for argv in reversed(undo):
    subprocess.run(argv, check=False, capture_output=True)
open("/proc/sys/kernel/core_pattern", "wb").write(pattern)
open("/proc/sys/kernel/core_pipe_limit", "wb").write(limit)
"""


class KernelSettings:
    """Saves core_pattern and core_pipe_limit under a lock and restores them, whatever happens: on any exit of
    the block, and through a watchdog process when the test process dies without leaving it (SIGKILL, a
    timeout's kill). Other host changes register their undo command with ``undo_on_abort``."""

    def __init__(self) -> None:
        self.lock = open(LOCK_PATH, "w")

    def __enter__(self) -> KernelSettings:
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.saved_pattern = CORE_PATTERN.read_bytes()
        self.saved_limit = PIPE_LIMIT.read_bytes()
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, self.saved_pattern.hex(),
                                           self.saved_limit.hex()], stdin=subprocess.PIPE, text=True,
                                          pass_fds=(self.lock.fileno(),), start_new_session=True)
        return self

    def set(self, pattern: str, pipe_limit: int = 64) -> None:
        PIPE_LIMIT.write_text(str(pipe_limit))
        CORE_PATTERN.write_text(pattern)
        assert CORE_PATTERN.read_text().rstrip("\n") == pattern, "the kernel did not take the pattern"

    def undo_on_abort(self, argv: list) -> None:
        """Run ``argv`` if the test process dies inside the block (the block's own cleanup covers the rest)."""
        self._watchdog.stdin.write(json.dumps(argv) + "\n")
        self._watchdog.stdin.flush()

    def __exit__(self, *exc: object) -> None:
        try:
            CORE_PATTERN.write_bytes(self.saved_pattern)
            PIPE_LIMIT.write_bytes(self.saved_limit)
        finally:
            try:
                self._watchdog.stdin.write("done\n")
                self._watchdog.stdin.close()
                self._watchdog.wait(timeout=30)
            finally:
                fcntl.flock(self.lock, fcntl.LOCK_UN)
                self.lock.close()


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
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


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


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """The first true value of ``predicate()``; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def dmesg_lines(needle: str) -> list:
    return [line for line in subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
            if needle in line]


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

    return [f"{d}/b", f"{d}/c.toml", f"{d}/sd/{install.DROPIN_NAME}", f"{d}/{install.STATE_NAME}"]


#: install.sh enables systemd units (the prune timer; the socket in socket mode) only where systemd runs.
SYSTEMD_RUNS = os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None
SYSTEMD_UNITS = [f"/etc/systemd/system/{name}" for name in ("corepipe-prune.timer", "corepipe-prune.service",
                                                             "corepipe.socket", "corepipe-forward.socket",
                                                             "corepipe.service")]


def check_restored(settings: KernelSettings, d: Path) -> None:
    """After uninstall: the kernel settings are back byte for byte and nothing install wrote is left (the
    systemd units included)."""
    assert CORE_PATTERN.read_bytes() == settings.saved_pattern
    assert PIPE_LIMIT.read_bytes() == settings.saved_limit
    assert not any(os.path.lexists(p) for p in installed_files(d) + SYSTEMD_UNITS)


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
