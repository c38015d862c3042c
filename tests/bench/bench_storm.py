"""Benchmark: a crash storm. N different executables crash at the same moment; how many are recorded, how many
cores are stored, how long until the last record is final, and how much memory the host used for it.

Run as root from the worktree (not part of the pytest run)::

    .venv/bin/python tests/bench/bench_storm.py [--crashes 128] [--mib 16] [--modes pipe,socket,zstd,systemd-coredump]
        [--concurrent-cores=-1,1,2,4,8,0]

Each mode and value of ``--concurrent-cores`` (the config key; -1 one per CPU, 0 no limit) is one
storm: corepipe as the pipe handler at install's core_pipe_limit (services/install.PIPE_LIMIT), or
``corepipe serve`` on a socket (kernel socket mode; the pipe handler as its fallback), or ``forwarded``: the pipe
handler with ``corepipe serve --mode pipe`` running (the handler hands each crash to the server; ``forwarded-c``:
the static C forwarder as the handler), through
support.KernelSettings (the tests' lock; restored afterwards), the crash-loop limits off so that
every core could be kept. The crashers (copies of tests/crasher.c under N names) fill ``--mib`` MiB,
stop themselves, and all get SIGCONT at once; the clock starts there. "peak host MiB" is the
largest rise of MemTotal - MemAvailable over the storm (sampled every 20 ms): the handlers, their
page cache and the crashed processes held by the kernel; "server MiB" (socket mode) the largest sum of
the RSS of the server and its workers. Baselines in the same run: ``zstd`` (the zstd CLI as the pipe
handler, at the same core_pipe_limit) and ``systemd-coredump`` (its pipe half, and its socket-activated
half started by hand, at its own core_pipe_limit of 16 from 50-coredump.conf); each of their cores is a
"record", stored once its handler has ended (the wrapper's log line), awaited for every crash the kernel "dumped"
(its wait status says so; not for a dump it skipped over core_pipe_limit). "kernel skipped" counts the storm's dmesg
lines "coredump: PID(COMM): ..." (a dump the kernel dropped; the kernel rate-limits them, so a large number is cut
short). Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import systemd_coredump
from bench_collect import MIB, TESTS, Bench, available, machine  # puts tests/ and src/ on the path
from support import CORE_PATTERN, KernelSettings, dropped_dumps, kernel_log_now, wait_for

from corepipe.services.install import PIPE_LIMIT


def _used_kib() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])


def _tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its children (the server's forked workers), 0 for what is gone."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(_tree_rss_kib(int(child)) for child in children)


class PeakMemory:
    """The highest MemTotal - MemAvailable (and RSS of ``server``'s process tree) seen, sampled in a thread."""

    def __init__(self, server: Optional[int] = None) -> None:
        self.base = self.peak = _used_kib()
        self.server, self.server_peak = server, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _used_kib())
            if self.server is not None:
                self.server_peak = max(self.server_peak, _tree_rss_kib(self.server))

    def stop(self) -> tuple:
        """(the host's peak rise, the server tree's peak RSS), in MiB."""
        self.done.set()
        self.thread.join()
        return (self.peak - self.base) // 1024, self.server_peak // 1024


def release(pids: list) -> tuple:
    """Let the stopped crashers go at once; (when, seconds until the last was reaped, how many the kernel dumped:
    their wait status says so, and it does not for a dump it skipped, over core_pipe_limit say)."""
    started = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    dumped = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        dumped += os.WIFSIGNALED(status) and os.WCOREDUMP(status)
    return started, time.monotonic() - started, dumped


def stopped_storm(bench: Bench, crashers: list, mib: int) -> list:
    """One stopped crasher per executable in ``crashers``, each filled with ``mib`` MiB, named c<N>."""
    pids = []
    try:
        for n, exe in enumerate(crashers):
            pid = os.posix_spawn(str(exe), [str(exe), str(mib), f"c{n}", str(int(signal.SIGSTOP))], {})
            pids.append(pid)
            _, status = os.waitpid(pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                raise RuntimeError(f"crasher {pid} did not stop (status {status:#x})")
    except BaseException:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    return pids


def final_records(store: Path) -> list:
    recs = []
    for path in store.rglob("record.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced
        if rec.get("status") != "collecting":
            recs.append(rec)
    return recs


def start_server(bench: Bench, mode: str = "socket") -> subprocess.Popen:
    """``corepipe serve`` in the bench's directory: on a socket (it sets the socket pattern itself), or in pipe
    mode (the pipe handler hands it the crashes)."""
    proc = subprocess.Popen([str(bench.dir / "h"), "serve", "--config", str(bench.dir / "c"), "--socket",
                             str(bench.dir / "s.sock"), "--run-dir", str(bench.dir / "run"), "--fallback",
                             bench.pattern("corepipe"), "--mode", mode], env={}, cwd="/", stdout=subprocess.DEVNULL,
                            stderr=(bench.dir / "serve.err").open("w"))
    wait_for(lambda: (CORE_PATTERN.read_text().startswith("@") if mode == "socket" else
                      (bench.dir / "run" / "serve.json").exists()) or proc.poll() is not None, 30,
             "the server to start")
    if proc.poll() is not None:
        raise RuntimeError(f"corepipe serve failed: {(bench.dir / 'serve.err').read_text()}")
    return proc


#: Pipe mode with serve running: the Python handler, or the static forwarder, hands each crash over.
FORWARDED = ("forwarded", "forwarded-c")
BASELINES = ("zstd", "systemd-coredump")


def baseline_storm(bench: Bench, crashers: list, mib: int, mode: str, timeout: float) -> dict:
    """The same storm for a baseline handler: its cores are its records, final once its handler has ended."""
    pids = stopped_storm(bench, crashers, mib)
    service = bench.systemd = systemd_coredump.Service(bench.wrapper) if mode == "systemd-coredump" else None
    before = len(bench.log_lines())
    try:
        with KernelSettings() as settings:
            settings.set(bench.pattern(mode), pipe_limit=systemd_coredump.PIPE_LIMIT if service else PIPE_LIMIT)
            mark = kernel_log_now()
            memory = PeakMemory()
            started, reaped, dumped = release(pids)
            skipped = dropped_dumps(mark, {f"c{n}" for n in range(len(pids))})  # rate-limited: not a count
            deadline = started + timeout
            while len(bench.log_lines()) - before < dumped and time.monotonic() < deadline:
                time.sleep(0.05)
            last = time.monotonic() - started
            peak, _ = memory.stop()
    finally:
        if service:
            service.stop()
    ended = bench.log_lines()[before:]
    stored = bench.outputs(mode)
    # systemd-coredump's files are decompressed to count their core (None if broken); zstd's are taken as whole.
    cut = sum(s.core_size is not None and s.core_size < mib * MIB or s.core_size is None and mode != "zstd"
              for s in stored)
    return {"mode": mode, "concurrent_cores": None, "crashes": len(pids), "records": len(stored),
            "cores": len(stored) - cut, "no_core": {"cut": cut} if cut else {}, "dumped": dumped,
            "kernel_skipped": len(skipped),
            "seconds_reaped": round(reaped, 3), "seconds_last_record": round(last, 3),
            "stored_mib": round(sum(s.stored for s in stored) / MIB, 1), "peak_host_mib": peak,
            "peak_server_mib": None,
            "max_handler_rss_mib": round(max((int(line.split()[0]) for line in ended), default=0) / 1024, 1)}


def storm(bench: Bench, crashers: list, mib: int, mode: str, concurrent: int, timeout: float) -> dict:
    (bench.dir / "c").write_text(f'store = "{bench.store}"\nrate_limit_exe = 0\nrate_limit_container = 0\n'
                                 f"container_max_cores = 0\nconcurrent_cores = {concurrent}\n")
    shutil.rmtree(bench.store, ignore_errors=True)
    pids = stopped_storm(bench, crashers, mib)
    server = None
    with KernelSettings() as settings:
        handler = "corepipe-forward-c" if mode == "forwarded-c" else "corepipe"
        settings.set(bench.pattern(handler), pipe_limit=PIPE_LIMIT)
        if mode in ("socket", *FORWARDED):
            server = start_server(bench, "pipe" if mode in FORWARDED else "socket")
        mark = kernel_log_now()
        memory = PeakMemory(server.pid if server else None)
        started, reaped, dumped = release(pids)
        deadline = started + timeout
        while len(recs := final_records(bench.store)) < len(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        last = time.monotonic() - started
        peak, server_peak = memory.stop()
        if server is not None:
            server.terminate()
            server.wait(60)
    stored = [r for r in recs if r["core"]["stored"]]
    reasons: dict = {}
    for r in recs:
        if not r["core"]["stored"]:
            key = (r["core"]["reason"] or "?").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    handler_rss = ([int(line.split()[0]) for line in bench.log_lines()[-len(pids):]] if mode in ("pipe", *FORWARDED)
                   else [])
    skipped = dropped_dumps(mark, {f"c{n}" for n in range(len(pids))})
    transports: dict = {}  # "forwarded": serve took it; "pipe": the handler collected it alone
    for r in recs:
        transports[r["collector"]["transport"]] = transports.get(r["collector"]["transport"], 0) + 1
    return {"mode": mode, "concurrent_cores": concurrent, "crashes": len(pids), "records": len(recs),
            "cores": len(stored), "no_core": reasons, "transports": transports, "dumped": dumped,
            "kernel_skipped": len(skipped),
            "seconds_reaped": round(reaped, 3), "seconds_last_record": round(last, 3),
            "stored_mib": round(sum(r["core"]["compressed_size"] for r in stored) / MIB, 1),
            "peak_host_mib": peak, "peak_server_mib": server_peak if server else None,
            "max_handler_rss_mib": round(max(handler_rss, default=0) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=128)
    parser.add_argument("--mib", type=int, default=16, help="heap each crasher fills")
    parser.add_argument("--modes", default="pipe",
                        help="comma-separated, of pipe,socket,forwarded (pipe mode with serve running),forwarded-c "
                             "(the same through the static forwarder),zstd,systemd-coredump")
    parser.add_argument("--concurrent-cores", default="-1", help="comma-separated values of concurrent_cores")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the records of one storm")
    parser.add_argument("--install-systemd-coredump", action="store_true",
                        help="apt-get install the systemd-coredump baseline if it is missing (its sysctl file masked)")
    parser.add_argument("--json", default=str(TESTS / "bench" / "storm.json"), help="where to write the results")
    ns = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it sets kernel.core_pattern")
    if ns.install_systemd_coredump and "systemd-coredump" in ns.modes.split(","):
        systemd_coredump.install()
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    bench = Bench()
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "core_pipe_limit": PIPE_LIMIT, "mib": ns.mib, "storms": []}
    try:
        crashers = []
        for n in range(ns.crashes):  # N executables: the per-executable rate limit would see one otherwise
            copy = bench.dir / f"x{n}"
            shutil.copy2(bench.crasher, copy)
            crashers.append(copy)
        print(f"{'mode':16} {'concurrent_cores':>16} {'records':>9} {'cores':>6} {'dumped':>6} {'kernel skipped':>14} "
              f"{'reaped s':>9} {'last record s':>13} {'stored MiB':>10} {'peak host MiB':>13} {'server MiB':>10} "
              f"{'handler RSS':>11}  no core, transports")
        for mode in ns.modes.split(","):
            if mode in BASELINES and available(mode):
                print(f"{mode}: skipped: {available(mode)}", flush=True)
                continue
            for value in [None] if mode in BASELINES else [int(v) for v in ns.concurrent_cores.split(",")]:
                r = (baseline_storm(bench, crashers, ns.mib, mode, ns.timeout) if value is None
                     else storm(bench, crashers, ns.mib, mode, value, ns.timeout))
                results["storms"].append(r)
                shown = "-" if value is None else value
                print(f"{mode:16} {shown:>16} {r['records']:>4}/{r['crashes']:<4} {r['cores']:>6} {r['dumped']:>6} "
                      f"{r['kernel_skipped']:>14} {r['seconds_reaped']:>9.2f} {r['seconds_last_record']:>13.2f} "
                      f"{r['stored_mib']:>10.1f} {r['peak_host_mib']:>13} {r['peak_server_mib'] or '-':>10} "
                      f"{r['max_handler_rss_mib']:>10.1f}M  {r['no_core']} {r.get('transports', '')}", flush=True)
    finally:
        bench.cleanup()
    results["machine"]["load_after"] = os.getloadavg()
    Path(ns.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results written to {ns.json}; load before {results['machine']['load_before']}, "
          f"after {results['machine']['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
