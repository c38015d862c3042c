"""Benchmark: ``corepipe list`` and ``list --json`` over a store of many crashes (not part of the pytest run).

    .venv/bin/python tests/bench/bench_list.py [--crashes 3000] [--reps 5] [--src DIR] [--against DIR]

The store is built through the store's own writer (store.Store, record.build, record.dumps), as collect
files crashes: each record is that of a real process (a snapshot of a live ``sleep`` with its /proc files:
maps, mountinfo, status, limits, environment), spread over 60 Docker containers and a few signatures, with
a backtrace and a small core. Then ``corepipe list --json`` and ``corepipe list`` run as a user runs them
(a process, output to a file), ``--reps`` times each; the median wall time and the output's size are
printed. Runs as any user (the store is a temporary directory). ``--against DIR`` (another checkout's
src, e.g. main's) runs that one too, in turns with this one on the same store, and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent.parent / "src"
sys.path.insert(0, str(SRC))

from corepipe.domain import record, snapshot  # noqa: E402
from corepipe.domain.containers import Container  # noqa: E402
from corepipe.platform.kernel import KernelArgs  # noqa: E402
from corepipe.platform.store import CORE, RECORD, Store  # noqa: E402

#: A zstd frame of 4 bytes of zeros: a stand-in core.
SMALL_CORE = bytes.fromhex("28b52ffd200421000000000000")
T0 = 1_790_000_000
BACKTRACE = "".join(f"#{n}  0x{0x401000 + n * 0x40:016x} in handler_{n} (req=0x7ffd5c0{n:02d}) at src/app.c:{n + 10}\n"
                    for n in range(20))


def build_store(root: Path, count: int) -> None:
    """``count`` crashes of a real process's snapshot, written as collect writes them."""
    child = subprocess.Popen(["sleep", "600"], env={"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                                                    "APP_MODE": "production", "TOKEN": "not-a-secret"})
    try:
        snap = snapshot.take(child.pid)
    finally:
        child.kill()
        child.wait()
    containers = [Container(runtime="docker", id=f"{n:064x}", confidence="certain", name=f"web-{n}",
                            image=f"registry.local/web:{n % 7}") for n in range(60)]
    with Store(str(root)) as store:
        for n in range(count):
            container = containers[n % len(containers)]
            when = T0 + n * 37
            crash = store.new_crash(container.policy_group(0), when)
            rec = record.build(crash_id=crash.id, args=KernelArgs(pid=1000 + n, ns_pid=1, tid=1000 + n, uid=0, gid=0,
                                                                  signal=(11, 6, 7)[n % 3], time=when,
                                                                  comm="sleep", hostname="node-1"),
                               snapshot=snap, container=container, redact_env=[])
            fd, name = crash.open_temp(CORE)
            os.write(fd, SMALL_CORE)
            crash.commit(fd, name, CORE)
            record.core_stored(rec, file=CORE, size=4 << 20, compressed_size=len(SMALL_CORE),
                               digest={"algorithm": "xxh3_128", "value": f"{n:032x}"}, truncated=False,
                               complete=True)
            record.set_backtrace(rec, {"tool": "gdb", "duration": 0.4, "truncated": False, "error": None,
                                       "text": BACKTRACE})
            record.set_signature(rec, {"text": f"sleep SIGSEGV: handler_{n % 9} | main", "hash": f"{n % 9:016x}",
                                       "algorithm": "frames", "version": 1, "source": "backtrace",
                                       "frames": [f"handler_{n % 9}", "main"], "fallback_reason": None})
            record.finish(rec, failed=False, duration=0.05, cpu=0.03, peak_rss=30 << 20)
            crash.write(RECORD, record.dumps(rec))
            crash.close()


def run_once(src: Path, config: Path, args: list, out: Path) -> float:
    """Wall time of one ``corepipe list ...`` writing to ``out``."""
    argv = [sys.executable, "-m", "corepipe", "--config", str(config), "list", *args]
    with open(out, "wb") as stdout:
        started = time.monotonic()
        proc = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, env={"PYTHONPATH": str(src),
                                                                               "PATH": "/usr/bin:/bin"}, timeout=600)
        elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"list {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=3000, help="crashes in the store")
    parser.add_argument("--reps", type=int, default=5, help="runs of each command (median)")
    parser.add_argument("--src", default=str(SRC), help="the corepipe source tree to run (default: this one)")
    parser.add_argument("--against", metavar="DIR", help="another source tree to time in turns with --src")
    ns = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpbl-"))
    try:
        store = work / "store"
        started = time.monotonic()
        build_store(store, ns.crashes)
        built = time.monotonic() - started
        config = work / "c.toml"
        config.write_text(f'store = "{store}"\n')
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"corepipe list over {ns.crashes} crashes (built in {built:.1f} s; median of {ns.reps}, "
              f"load {os.getloadavg()[0]:.2f}, {when})")
        sources = [Path(ns.src)] + ([Path(ns.against)] if ns.against else [])
        for args in (["--json"], []):
            times: dict = {src: [] for src in sources}
            sizes: dict = {}
            for _ in range(ns.reps):
                for src in sources:
                    out = work / "out"
                    times[src].append(run_once(src, config, args, out))
                    sizes[src] = out.stat().st_size
            medians = {src: statistics.median(times[src]) for src in sources}
            for src in sources:
                ratio = f", {medians[src] / medians[sources[0]]:.1f}x" if src != sources[0] else ""
                print(f"  list {' '.join(args) or '(table)':<8} {medians[src]:.3f} s  (min {min(times[src]):.3f}, "
                      f"max {max(times[src]):.3f}), {sizes[src] / 1e6:.1f} MB  {src}{ratio}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
