"""Benchmark: the time to store one crash in a store that already holds many (not part of the pytest run).

    .venv/bin/python tests/bench/bench_store.py [--crashes 20000] [--reps 5]

Storing a core decides under the store lock what the store holds (admission); that must not cost more
as the store fills. The store is pre-filled with ``--crashes`` crash directories (record and a small
core each, spread over 200 containers, as a host after a long storm), then ``corepipe collect`` is run
the way the kernel runs it (a process, empty environment, a 1 MiB core on stdin, for a live process)
``--reps`` times; the median wall time is printed beside the same for an empty store. Runs as any
user (the store is a temporary directory); also against an older checkout (``--src``) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent.parent / "src"
CORE = b"\x7fELF" + os.urandom(1 << 19) + bytes(1 << 19)
#: A zstd frame of 4 bytes of zeros: a stand-in core for the pre-filled crashes.
SMALL_CORE = bytes.fromhex("28b52ffd200421000000000000")


def prefill(store: Path, count: int) -> None:
    """``count`` crash directories with a record and a core, as the handler lays them out."""
    for n in range(count):
        group = store / "docker" / f"{n % 200:064x}"
        crash_id = f"{n:012x}"
        crash = group / f"20261201T{n // 3600 % 24:02d}{n // 60 % 60:02d}{n % 60:02d}Z-{crash_id}"
        crash.mkdir(parents=True, mode=0o700)
        (crash / "core.zst").write_bytes(SMALL_CORE)
        record = {"schema": 1, "id": crash_id, "status": "complete", "timestamp": 1764547200 + n,
                  "core": {"file": "core.zst", "stored": True, "size": 4, "compressed_size": len(SMALL_CORE)}}
        (crash / "record.json").write_text(json.dumps(record))


def store_one(src: Path, store: Path, config: Path, pid: int, n: int) -> float:
    """Wall time of one ``corepipe collect`` storing a 1 MiB core."""
    argv = [sys.executable, "-m", "corepipe", "collect", "--config", str(config), str(pid), str(pid), str(pid),
            str(os.getuid()), str(os.getgid()), "11", str(int(time.time())), str(2**64 - 1), "1", "-", "bench",
            f"bench{n}"]
    started = time.monotonic()
    proc = subprocess.run(argv, input=CORE, capture_output=True, env={"PYTHONPATH": str(src)}, cwd="/",
                          timeout=120)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"collect failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return elapsed


def measure(src: Path, crashes: int, reps: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="cpbs-"))
    child = subprocess.Popen(["sleep", "600"])
    try:
        store = work / "store"
        store.mkdir(mode=0o700)
        prefill(store, crashes)
        os.sync()  # the pre-fill's writeback must not land on the measured crashes' fsyncs
        config = work / "c.toml"
        config.write_text(f'store = "{store}"\nrate_limit_container = 0\nrate_limit_exe = 0\n'
                          "container_max_cores = 0\nmax_use = 0\nkeep_free = 0\nbacktrace = false\n"
                          "binaries = false\n")
        store_one(src, store, config, child.pid, -1)  # the first one may build the ledger: not counted
        return statistics.median(store_one(src, store, config, child.pid, n) for n in range(reps))
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=20000, help="crash directories in the full store")
    parser.add_argument("--reps", type=int, default=5, help="crashes stored per measurement (median)")
    parser.add_argument("--src", default=str(SRC), help="the corepipe source tree to run (default: this one)")
    ns = parser.parse_args()
    src = Path(ns.src)
    empty = measure(src, 0, ns.reps)
    full = measure(src, ns.crashes, ns.reps)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"store one crash (median of {ns.reps}, load {os.getloadavg()[0]:.2f}, {when})")
    print(f"  empty store:           {empty:.3f} s")
    print(f"  {ns.crashes} crashes stored: {full:.3f} s  ({full / empty:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
