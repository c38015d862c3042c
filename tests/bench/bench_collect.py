"""Benchmark: crash-to-reap time and handler peak RSS of corepipe against other core_pattern handlers.

Run as root from the worktree (not part of the pytest run)::

    sudo .venv/bin/python tests/bench/bench_collect.py [--quick] [--cases 1m,1g] [--handlers corepipe,zstd]

For each case it installs every handler in turn as kernel.core_pattern (through
support.KernelSettings: the tests' global lock, and core_pattern/core_pipe_limit restored
afterwards), crashes tests/crasher.c and measures the parent's wait on the crashing child.
The crasher fills its heap, stops itself (SIGSTOP); the clock starts at SIGCONT, after which
it crashes at once, so the fill is not timed. Handlers run under rsswrap.c, which logs their
peak RSS and wall time. Every case is repeated; medians are printed as ratios to the zstd CLI
from the same run, with the machine's load average, and a warning for a case whose runs spread
by more than SPREAD; everything is written as JSON. Outputs go to a temporary directory and are
deleted after each crash. A container case (``docker-1g``) crashes the crasher inside a Docker
container (the handler identifies it before letting go) and, in the same round, on the host:
its ``x host`` is the ratio of the two. ``zstd-socket`` is the same zstd CLI reading the kernel's coredump
socket (socket_zstd.py): what the socket costs before any work of corepipe's, for ``corepipe-serve``.
``corepipe-forward`` is pipe mode with ``corepipe serve --mode pipe`` running: the kernel's pipe handler hands
the crash to the server (docs/forwarding.md); ``corepipe-forward-c`` the same through the static C
forwarder, built as ``corepipe install`` builds it (platform/static_forwarder.py). Their peak RSS and handler
seconds are the forwarder's own (under rsswrap); the record's collector figures are the server worker's.
``systemd-coredump`` is Debian's package with its socket half started by hand and its size limits raised
(systemd_coredump.py; ``--install-systemd-coredump`` installs it); its cores are decompressed to check that each is
whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "src"))

import runtimes  # noqa: E402
import systemd_coredump  # noqa: E402
from support import KernelSettings  # noqa: E402

from corepipe.platform import launcher, static_forwarder  # noqa: E402
from corepipe.platform.kernel import build_pattern  # noqa: E402

ZSTD = shutil.which("zstd") or "/usr/bin/zstd"
CAT = shutil.which("cat") or "/bin/cat"
MIB = 1 << 20

#: name -> (crasher MiB, crashes at once, repetitions, repetitions with --quick)
CASES = {
    "1m": (1, 1, 15, 5),
    "256m": (256, 1, 5, 2),
    "1g": (1024, 1, 5, 2),
    "2g": (2048, 1, 5, 1),
    "burst": (16, 32, 3, 1),
    "docker-1g": (1024, 1, 5, 2),
}
#: Cases whose crasher runs in a container of this runtime (each round also crashes it on the host).
CONTAINER_CASES = {"docker-1g": "docker"}
#: (slowest - fastest) / median of a case's runs above which the report warns that it is noisy.
SPREAD = 0.20
#: corepipe runs with its default config except the crash-loop limits: the burst is 32 crashes of one
#: executable, of which the default ``rate_limit_exe`` (5 in 10 minutes) would store 5 cores.
RATE_LIMITS_OFF = "rate_limit_exe = 0\nrate_limit_container = 0\n"
HANDLERS = ("corepipe", "corepipe-serve", "corepipe-forward", "corepipe-forward-c", "zstd", "zstd-socket", "cat",
            "kernel", "systemd-coredump")
#: Handlers collected by ``corepipe serve``, and those of them in pipe mode (the handler hands the crash over).
SERVED = ("corepipe-serve", "corepipe-forward", "corepipe-forward-c")
FORWARDED = ("corepipe-forward", "corepipe-forward-c")
#: Handlers that read the kernel's coredump socket.
SOCKET_HANDLERS = ("corepipe-serve", "zstd-socket")
BASELINE = "zstd"


class Output(NamedTuple):
    """One core a handler stored; corepipe's record gives the uncompressed size and its own figures."""

    core_size: Optional[int]
    stored: int
    peak_rss: Optional[int] = None
    cpu: Optional[float] = None
    runtime: Optional[str] = None


class Bench:
    """The scratch directory with the crasher, the wrapper, the handler scripts and their outputs."""

    def __init__(self, config_extra: str = ""):
        self.dir = Path(tempfile.mkdtemp(prefix="cpb-", dir="/tmp"))  # short: core_pattern has 127 bytes
        self.dir.chmod(0o755)
        self.out = self.dir / "o"
        self.out.mkdir()
        self.store = self.dir / "s"
        self.crasher = self.dir / "crasher"
        self.wrapper = self.dir / "w"
        self.log = Path(f"{self.wrapper}.log")
        self.systemd: Optional[systemd_coredump.Service] = None  # while the systemd-coredump baseline runs
        subprocess.run(["gcc", "-O0", "-static", "-o", str(self.crasher), str(TESTS / "crasher.c")], check=True)
        subprocess.run(["gcc", "-O2", "-o", str(self.wrapper), str(TESTS / "bench" / "rsswrap.c")], check=True)
        (self.dir / "c").write_text(f'store = "{self.store}"\n{RATE_LIMITS_OFF}{config_extra}\n')
        self.forward_socket = self.dir / "run" / "forward.sock"  # the bench's server only, never a real one
        self._script("h", launcher.script(forward=str(self.forward_socket)))
        # The static forwarder as `corepipe install` builds it.
        (self.dir / "f").write_bytes(static_forwarder.build(str(self.forward_socket), str(self.dir / "h")))
        (self.dir / "f").chmod(0o755)
        self._script("z", f'#!/bin/sh\nexec {ZSTD} -q -T0 -3 > "{self.out}/$1.zst"\n')
        self._script("k", f'#!/bin/sh\nexec {CAT} > "{self.out}/$1.core"\n')

    def _script(self, name: str, text: str) -> None:
        path = self.dir / name
        path.write_text(text)
        path.chmod(0o755)

    def pattern(self, handler: str) -> str:
        w = self.wrapper
        if handler in ("corepipe", "corepipe-forward"):
            return f"|{w} " + build_pattern(str(self.dir / "h"), str(self.dir / "c"))[1:]
        if handler == "corepipe-forward-c":
            return f"|{w} " + build_pattern(str(self.dir / "f"), str(self.dir / "c"))[1:]
        if handler == "zstd":
            return f"|{w} {self.dir}/z %P"
        if handler == "cat":
            return f"|{w} {self.dir}/k %P"
        if handler == "kernel":
            return f"{self.out}/%P.core"
        if handler == "systemd-coredump":
            return systemd_coredump.PATTERN
        if handler == "corepipe-serve":
            return CorepipeServe.pattern(self)
        if handler == "zstd-socket":
            return ZstdSocket.pattern(self)
        raise ValueError(handler)

    def log_lines(self) -> list:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def outputs(self, handler: str) -> list:
        """An Output for each core the handler stored, then deletes them."""
        found = []
        if handler == "corepipe" or handler in SERVED:
            for rec_path in self.store.rglob("record.json"):
                rec = json.loads(rec_path.read_text())
                core = rec_path.parent / "core.zst"
                if rec.get("status") == "complete" and core.exists():
                    found.append(Output(rec["core"]["size"], core.stat().st_size, rec["collector"].get("peak_rss"),
                                        rec["collector"].get("cpu"), rec["container"]["runtime"]))
            shutil.rmtree(self.store, ignore_errors=True)
        elif handler == "systemd-coredump":
            found = [Output(core, stored) for stored, core in self.systemd.stored()]
        else:
            for path in self.out.iterdir():
                found.append(Output(None, path.stat().st_blocks * 512 if handler == "kernel" else path.stat().st_size))
                path.unlink()
        return found

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_started(proc: subprocess.Popen, ready: Path, what: str, timeout: float = 30) -> None:
    """Until the server ``proc`` has created ``ready``; RuntimeError if it exits or takes over ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


class SocketServer:
    """A server on the kernel's coredump socket ``SOCKET`` in the bench's directory, stopped by PID (SIGTERM;
    corepipe serve stops only after its workers, once every crash has its final record)."""

    SOCKET = ""
    proc: subprocess.Popen

    @classmethod
    def pattern(cls, bench: Bench) -> str:
        return f"@@{bench.dir}/{cls.SOCKET}"

    def stop(self, bench: Bench) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        (bench.dir / self.SOCKET).unlink(missing_ok=True)


class CorepipeServe(SocketServer):
    """``corepipe serve`` (socket mode), started for each run under the run's KernelSettings lock (it writes
    the pattern itself) with the pipe handler as its fallback, and stopped (by PID) at the run's end."""

    SOCKET = "s.sock"

    def __init__(self, bench: Bench, mode: str = "socket"):
        self.proc = subprocess.Popen([str(bench.dir / "h"), "serve", "--config", str(bench.dir / "c"), "--socket",
                                      str(bench.dir / self.SOCKET), "--run-dir", str(bench.dir / "run"), "--fallback",
                                      bench.pattern("corepipe"), "--mode", mode], env={}, cwd="/",
                                     stdout=subprocess.DEVNULL)
        wait_started(self.proc, bench.dir / "run" / "serve.json", "corepipe serve")


class ZstdSocket(SocketServer):
    """The zstd CLI reading the coredump socket (socket_zstd.py), under rsswrap as the pipe handler is: the
    socket's own cost, beside the pipe's, in the same run. Started for each run under its lock, before the
    pattern points at it, and stopped by PID."""

    SOCKET = "zs.sock"

    def __init__(self, bench: Bench):
        path = bench.dir / self.SOCKET
        ready = Path(f"{path}.ready")
        ready.unlink(missing_ok=True)  # the last run's server made it: this one has not listened yet
        self.proc = subprocess.Popen([sys.executable, str(TESTS / "bench" / "socket_zstd.py"), str(path),
                                      str(bench.wrapper), str(bench.dir / "z")], stdout=subprocess.DEVNULL)
        wait_started(self.proc, ready, "the zstd socket server")


def available(handler: str) -> Optional[str]:
    """None when the handler can run here, else why not."""
    if handler == "systemd-coredump":
        return systemd_coredump.unavailable()
    if handler in SOCKET_HANDLERS and "socket" not in Path("/proc/sys/kernel/core_modes").read_text().split():
        return "this kernel has no coredump socket mode (6.16+)"
    return None


class DockerCrasher:
    """A Docker image of the crasher (tests/runtimes.py), and crashers started in containers of it."""

    def __init__(self, bench: Bench):
        self.images = runtimes.image("docker", runtimes.make_rootfs(bench.dir / "docker", bench.crasher), "cpbench")
        self.image = self.images.__enter__()
        self.name: Optional[str] = None

    def stopped(self, mib: int) -> int:
        """Start a container whose crasher fills ``mib`` MiB and stops itself; its host PID.

        The crasher is the child of the container's shell (a PID 1 cannot stop itself)."""
        self.name = runtimes.unique("cpbench")
        subprocess.run(["docker", "run", "-d", "--name", self.name, "--network=none", "--ulimit", "core=-1",
                        self.image, "/bin/sh", "-c", f"/crasher {mib} crasher {int(signal.SIGSTOP)}; true"],
                       check=True, capture_output=True, timeout=120)
        shell = int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", self.name], check=True,
                                   capture_output=True, text=True, timeout=60).stdout)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
            if children and _state(int(children[0])) == "T":
                return int(children[0])
            time.sleep(0.05)
        raise RuntimeError(f"the crasher in container {self.name} did not stop")

    def remove(self) -> None:
        if self.name:
            subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=120)
            self.name = None

    def close(self) -> None:
        self.remove()
        self.images.__exit__(None, None, None)


def _state(pid: int) -> str:
    """A process's state letter from /proc/<pid>/stat ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def crash_in_container(pid: int) -> tuple:
    """Crash a stopped crasher that is not our child; (seconds until it has exited, 1).

    Its pidfd turns readable when it exits, which the kernel allows once the handler has let go,
    as our own child's waitpid does in ``crash``."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        started = time.perf_counter()
        os.kill(pid, signal.SIGCONT)
        if not poller.poll(300_000):
            raise RuntimeError(f"the crasher {pid} did not exit within 300 s")
        return time.perf_counter() - started, 1
    finally:
        os.close(pidfd)


def container_unavailable() -> Optional[str]:
    """None when Docker and busybox-static are there for a container case, else why not."""
    if not os.path.exists(runtimes.BUSYBOX):
        return f"needs busybox-static at {runtimes.BUSYBOX}"
    if not runtimes.docker_usable():
        return "needs a running dockerd (docker info failed)"
    return None


def stopped_crashers(bench: Bench, mib: int, count: int) -> list:
    """Start ``count`` crashers that fill ``mib`` MiB and stop themselves before crashing."""
    pids = [os.posix_spawn(str(bench.crasher), [str(bench.crasher), str(mib), "crasher", str(int(signal.SIGSTOP))],
                           {}) for _ in range(count)]
    for pid in pids:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            for other in pids:
                if other != pid:
                    os.kill(other, signal.SIGKILL)
                    os.waitpid(other, 0)
            raise RuntimeError(f"crasher {pid} did not stop (status {status:#x})")
    return pids


def crash(bench: Bench, mib: int, count: int) -> tuple:
    """Crash ``count`` crashers at once; returns (seconds until the last is reaped, how many dumped a core)."""
    pids = stopped_crashers(bench, mib, count)
    try:
        started = time.perf_counter()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        dumped = 0
        while pids:
            _, status = os.waitpid(pids[0], 0)
            pids.pop(0)
            dumped += os.WIFSIGNALED(status) and os.WCOREDUMP(status)
        return time.perf_counter() - started, dumped
    finally:
        for pid in pids:  # interrupted: no stopped crasher left behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def wait_logged(bench: Bench, before: int, count: int, timeout: float = 120) -> list:
    """The wrapper's lines for the ``count`` handlers started since the log had ``before`` lines."""
    deadline = time.monotonic() + timeout
    while True:
        lines = bench.log_lines()[before:]
        if len(lines) >= count or time.monotonic() > deadline:
            return [line.split() for line in lines]
        time.sleep(0.01)


def run_case(bench: Bench, handler: str, mib: int, count: int, container: Optional[DockerCrasher] = None) -> dict:
    before = len(bench.log_lines())
    try:
        pid = container.stopped(mib) if container else None  # before the lock: other tests wait on it
        with KernelSettings() as settings:
            server = ZstdSocket(bench) if handler == "zstd-socket" else None  # listening before the pattern
            try:
                settings.set(bench.pattern("corepipe" if handler == "corepipe-serve" else handler), pipe_limit=64)
                if handler in SERVED:
                    server = CorepipeServe(bench, "pipe" if handler in FORWARDED else "socket")
                seconds, dumped = crash_in_container(pid) if container else crash(bench, mib, count)
                logged = wait_logged(bench, before, count) if handler not in ("kernel", "corepipe-serve") else []
            finally:
                if server is not None:
                    server.stop(bench)
    finally:
        if container:
            container.remove()
    stored = bench.outputs(handler)
    os.sync()  # the next run starts without this one's dirty pages being written back
    return {
        "seconds": seconds,
        "dumped": dumped,
        "collected": len(stored),
        # corepipe serve's worker is not under rsswrap: its record's collector.peak_rss and cpu instead.
        "peak_rss_kib": max((int(line[0]) for line in logged), default=None) if logged else max(
            (s.peak_rss // 1024 for s in stored if s.peak_rss is not None), default=None),
        "handler_seconds": max((float(line[1]) for line in logged), default=None),
        "handler_cpu_seconds": sum(float(line[3]) for line in logged) if logged else (
            sum(s.cpu for s in stored) if stored and all(s.cpu is not None for s in stored) else None),
        "load": os.getloadavg()[0],
        "stored_bytes": sum(s.stored for s in stored),
        "core_bytes": sum(s.core_size for s in stored if s.core_size is not None) or None,
        "self_reported_peak_rss": max((s.peak_rss for s in stored if s.peak_rss is not None), default=None),
        "runtimes": sorted({s.runtime for s in stored if s.runtime is not None}),
    }


def summarise(runs: list) -> dict:
    def median(key: str) -> Optional[float]:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    seconds = [r["seconds"] for r in runs]
    return {
        "median_seconds": median("seconds"),
        "min_seconds": min(seconds),
        "spread": (max(seconds) - min(seconds)) / statistics.median(seconds),
        "median_handler_seconds": median("handler_seconds"),
        "median_handler_cpu_seconds": median("handler_cpu_seconds"),
        "max_peak_rss_kib": max((r["peak_rss_kib"] for r in runs if r["peak_rss_kib"] is not None), default=None),
        "median_stored_bytes": median("stored_bytes"),
        "min_collected": min(r["collected"] for r in runs),
        "runs": runs,
    }


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    zstd_version = subprocess.run([ZSTD, "--version"], capture_output=True, text=True).stdout.strip()
    import zstandard

    return {
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB,
        "python": sys.version.split()[0],
        "python-zstandard": zstandard.__version__,
        "zstd-cli": zstd_version,
        "load_before": os.getloadavg(),
    }


def report(results: dict) -> None:
    machine_info = results["machine"]
    print(f"\nload average (1, 5, 15 min): {_loads(machine_info['load_before'])} at the start, "
          f"{_loads(machine_info['load_after'])} at the end")
    print(f"{'case':9} {'handler':17} {'median s':>9} {'x zstd':>7} {'paired':>7} {'spread':>7} {'cpu s':>7} "
          f"{'x zstd':>7} {'peak RSS':>9} {'stored MiB':>10} {'x zstd':>7} {'x host':>7} {'collected':>9}")
    warnings = []
    for case, handlers in results["cases"].items():
        base = handlers.get(BASELINE)
        base = base if base and "skipped" not in base else None
        # The whole core's size: corepipe's records and systemd-coredump's decompressed files give it.
        whole = max((r["core_bytes"] or 0 for s in handlers.values() for r in s.get("runs", ())), default=0)
        for handler, s in handlers.items():
            if "skipped" in s:
                print(f"{case:9} {handler:17} skipped: {s['skipped']}")
                continue
            ratio = s["median_seconds"] / base["median_seconds"] if base else None
            # Each run against the baseline's run of the same round: less sensitive to the machine's load drifting.
            s["median_paired_ratio_to_zstd"] = _paired(s["runs"], base["runs"]) if base else None
            size_ratio = (s["median_stored_bytes"] / base["median_stored_bytes"]
                          if base and base["median_stored_bytes"] else None)
            cpu, base_cpu = s["median_handler_cpu_seconds"], base and base["median_handler_cpu_seconds"]
            s["ratio_to_zstd"] = ratio
            s["size_ratio_to_zstd"] = size_ratio
            s["cpu_ratio_to_zstd"] = cpu / base_cpu if cpu is not None and base_cpu else None
            s["paired_ratio_to_host"] = _paired(s["runs"], s["host"]["runs"]) if "host" in s else None
            rss = f"{s['max_peak_rss_kib'] / 1024:.1f}M" if s["max_peak_rss_kib"] else "-"
            count = CASES[case][1]
            print(f"{case:9} {handler:17} {s['median_seconds']:9.3f} {_fmt(ratio):>7} "
                  f"{_fmt(s['median_paired_ratio_to_zstd']):>7} {s['spread']:7.0%} {_fmt(cpu, 3):>7} "
                  f"{_fmt(s['cpu_ratio_to_zstd']):>7} {rss:>9} {s['median_stored_bytes'] / MIB:10.1f} "
                  f"{_fmt(size_ratio):>7} {_fmt(s['paired_ratio_to_host']):>7} {s['min_collected']:>5}/{count}")
            if s["min_collected"] < count:
                warnings.append(f"warning: {case} {handler}: a run stored {s['min_collected']} of {count} cores")
            if handler == "systemd-coredump" and any((r["core_bytes"] or 0) < 0.99 * whole for r in s["runs"]):
                warnings.append(f"warning: {case} {handler}: a stored core was cut or does not decompress whole")
            wanted = CONTAINER_CASES.get(case, "host")
            if handler == "corepipe" and any(r["runtimes"] != [wanted] for r in s["runs"]):
                warnings.append(f"warning: {case} {handler}: a record's container.runtime was not {wanted!r}")
            for what, summary in (("", s), (" (on the host)", s.get("host"))):
                if summary and summary["spread"] > SPREAD:
                    times = [r["seconds"] for r in summary["runs"]]
                    warnings.append(f"warning: {case} {handler}{what}: its runs spread by {summary['spread']:.0%} "
                                    f"({min(times):.3f}-{max(times):.3f} s), over {SPREAD:.0%}: a noisy measurement")
    for line in warnings:
        print(line)


def _paired(runs: list, base_runs: list) -> float:
    """The median of each run's time over that of the baseline's run in the same round."""
    return statistics.median(r["seconds"] / b["seconds"] for r, b in zip(runs, base_runs))


def _loads(loads: tuple) -> str:
    return ", ".join(f"{x:.2f}" for x in loads)


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    parser.add_argument("--handlers", default=",".join(HANDLERS), help=f"comma-separated, of {','.join(HANDLERS)}")
    parser.add_argument("--reps", type=int, help="repetitions of every case (default: per case)")
    parser.add_argument("--install-systemd-coredump", action="store_true",
                        help="apt-get install the systemd-coredump baseline if it is missing (its sysctl file masked)")
    parser.add_argument("--config-extra", default="", help="lines added to corepipe's config (to measure a setting)")
    parser.add_argument("--json", default=str(TESTS / "bench" / "results.json"), help="where to write the results")
    ns = parser.parse_args()
    cases = ns.cases.split(",")
    handlers = ns.handlers.split(",")
    if BASELINE in handlers:  # the baseline first, then the others, in the same round
        handlers.remove(BASELINE)
        handlers.insert(0, BASELINE)
    for name in cases + handlers:
        if name not in CASES and name not in HANDLERS:
            parser.error(f"unknown case or handler {name!r}")
    if os.geteuid() != 0:
        parser.error("run as root: it sets kernel.core_pattern")
    if ns.install_systemd_coredump and "systemd-coredump" in handlers:
        systemd_coredump.install()
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    bench = Bench(ns.config_extra.replace('\\n', '\n'))
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "cases": {}}
    container: Optional[DockerCrasher] = None
    try:
        for handler in list(handlers):
            why = available(handler)
            if why:
                print(f"skipping {handler}: {why}", file=sys.stderr)
                handlers.remove(handler)
                for case in cases:
                    results["cases"].setdefault(case, {})[handler] = {"skipped": why}
        if "systemd-coredump" in handlers:
            bench.systemd = systemd_coredump.Service(bench.wrapper)
        for case in cases:
            mib, count, reps, quick_reps = CASES[case]
            reps = ns.reps or (quick_reps if ns.quick else reps)
            case_handlers, places = handlers, [None]
            if case in CONTAINER_CASES:
                why = container_unavailable()
                if why:
                    print(f"skipping {case}: {why}", file=sys.stderr)
                    results["cases"][case] = {h: {"skipped": why} for h in handlers}
                    continue
                container = container or DockerCrasher(bench)
                # The kernel would write its file inside the container's own mount namespace.
                case_handlers, places = [h for h in handlers if h != "kernel"], [None, container]
            runs: dict = {(h, p): [] for h in case_handlers for p in places}
            for rep in range(reps):
                # Rotate the order: whoever runs after a big raw write pays for its writeback otherwise.
                for handler in case_handlers[rep % len(case_handlers):] + case_handlers[:rep % len(case_handlers)]:
                    for place in places[rep % len(places):] + places[:rep % len(places)]:
                        run = run_case(bench, handler, mib, count, place)
                        runs[handler, place].append(run)
                        where = " on the host" if len(places) > 1 and not place else ""
                        print(f"{case} {rep + 1}/{reps} {handler}{where}: {run['seconds']:.3f} s, "
                              f"cpu {run['handler_cpu_seconds']} s, rss {run['peak_rss_kib']} KiB, "
                              f"{run['collected']}/{count} collected", file=sys.stderr)
            for handler in case_handlers:
                summary = results["cases"].setdefault(case, {})[handler] = summarise(runs[handler, places[-1]])
                if len(places) > 1:
                    summary["host"] = summarise(runs[handler, None])
    finally:
        if bench.systemd:
            bench.systemd.stop()
        if container:
            container.close()
        bench.cleanup()
    results["machine"]["load_after"] = os.getloadavg()
    report(results)
    Path(ns.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults written to {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
