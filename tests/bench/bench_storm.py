"""Benchmark: a crash storm. N different executables crash at the same moment; how many are recorded, how many
cores are stored, how long until the last record is final, and how much memory the host used for it.

Run as root from the worktree (not part of the pytest run)::

    .venv/bin/python tests/bench/bench_storm.py [--crashes 128] [--mib 16] [--concurrent-cores -1,1,2,4,8,0]

Each value of ``--concurrent-cores`` (the config key; -1 one per CPU, 0 no limit) is one storm, with
corepipe as the pipe handler at install's core_pipe_limit (services/install.PIPE_LIMIT) through
support.KernelSettings (the tests' lock; restored afterwards), the crash-loop limits off so that
every core could be kept. The crashers (copies of tests/crasher.c under N names) fill ``--mib`` MiB,
stop themselves, and all get SIGCONT at once; the clock starts there. "peak host MiB" is the
largest rise of MemTotal - MemAvailable over the storm (sampled every 20 ms): the handlers, their
page cache and the crashed processes held by the kernel. "kernel skipped" counts new dmesg lines
"over core_pipe_limit". Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from bench_collect import MIB, TESTS, Bench, machine
from support import KernelSettings, dmesg_lines

from corepipe.services.install import PIPE_LIMIT

SKIPPED = "over core_pipe_limit"


def _used_kib() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])


class PeakMemory:
    """The highest MemTotal - MemAvailable seen, sampled in a thread until ``stop``."""

    def __init__(self) -> None:
        self.base = self.peak = _used_kib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _used_kib())

    def stop(self) -> int:
        """The peak rise in MiB."""
        self.done.set()
        self.thread.join()
        return (self.peak - self.base) // 1024


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


def storm(bench: Bench, crashers: list, mib: int, concurrent: int, timeout: float) -> dict:
    (bench.dir / "c").write_text(f'store = "{bench.store}"\nrate_limit_exe = 0\nrate_limit_container = 0\n'
                                 f"container_max_cores = 0\nconcurrent_cores = {concurrent}\n")
    shutil.rmtree(bench.store, ignore_errors=True)
    skipped_before = len(dmesg_lines(SKIPPED))
    pids = stopped_storm(bench, crashers, mib)
    with KernelSettings() as settings:
        settings.set(bench.pattern("corepipe"), pipe_limit=PIPE_LIMIT)
        memory = PeakMemory()
        started = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for pid in pids:
            os.waitpid(pid, 0)
        reaped = time.monotonic() - started
        deadline = started + timeout
        while len(recs := final_records(bench.store)) < len(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        last = time.monotonic() - started
        peak = memory.stop()
    stored = [r for r in recs if r["core"]["stored"]]
    reasons: dict = {}
    for r in recs:
        if not r["core"]["stored"]:
            key = (r["core"]["reason"] or "?").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    handler_rss = [int(line.split()[0]) for line in bench.log_lines()[-len(pids):]]
    return {"concurrent_cores": concurrent, "crashes": len(pids), "records": len(recs), "cores": len(stored),
            "no_core": reasons, "kernel_skipped": len(dmesg_lines(SKIPPED)) - skipped_before,
            "seconds_reaped": round(reaped, 3), "seconds_last_record": round(last, 3),
            "stored_mib": round(sum(r["core"]["compressed_size"] for r in stored) / MIB, 1),
            "peak_host_mib": peak, "max_handler_rss_mib": round(max(handler_rss, default=0) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=128)
    parser.add_argument("--mib", type=int, default=16, help="heap each crasher fills")
    parser.add_argument("--concurrent-cores", default="-1", help="comma-separated values of concurrent_cores")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the records of one storm")
    parser.add_argument("--json", default=str(TESTS / "bench" / "storm.json"), help="where to write the results")
    ns = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it sets kernel.core_pattern")
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
        print(f"{'concurrent_cores':>16} {'records':>9} {'cores':>6} {'kernel skipped':>14} {'reaped s':>9} "
              f"{'last record s':>13} {'stored MiB':>10} {'peak host MiB':>13} {'handler RSS':>11}  no core")
        for value in (int(v) for v in ns.concurrent_cores.split(",")):
            r = storm(bench, crashers, ns.mib, value, ns.timeout)
            results["storms"].append(r)
            print(f"{value:>16} {r['records']:>4}/{r['crashes']:<4} {r['cores']:>6} {r['kernel_skipped']:>14} "
                  f"{r['seconds_reaped']:>9.2f} {r['seconds_last_record']:>13.2f} {r['stored_mib']:>10.1f} "
                  f"{r['peak_host_mib']:>13} {r['max_handler_rss_mib']:>10.1f}M  {r['no_core']}", flush=True)
    finally:
        bench.cleanup()
    results["machine"]["load_after"] = os.getloadavg()
    Path(ns.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results written to {ns.json}; load before {results['machine']['load_before']}, "
          f"after {results['machine']['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
