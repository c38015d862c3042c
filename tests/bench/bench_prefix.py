"""Benchmark: the page faults of the core's prefix buffer (not part of the pytest run: a performance figure,
and one transparent huge pages change: with THP ``always`` one fault maps 2 MiB).

    .venv/bin/python tests/bench/bench_prefix.py [--reps 5]

Prints, as the median of ``--reps`` runs, the minor page faults of: the kernel's copy of a 1 MiB core into a
buffer faulted ahead (a server's idle worker makes one before its crash: the goal is none of 256 pages),
making the pipe handler's lazy 4 MiB buffer (the goal is none of 1,024 pages), and filling 1 MiB of it (about
256: the measure sees fresh pages). Also the THP mode, which the figures depend on. Runs as any user.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent.parent / "src"), str(Path(__file__).resolve().parent.parent)]

from support import piped  # noqa: E402

from corepipe.platform import capture  # noqa: E402

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faulted_read() -> int:
    data = os.urandom(1 << 20)
    buffer = capture.prefix_buffer()
    fd = piped(data)
    try:
        before = faults()
        got, eof = capture.read_prefix(fd, capture.CORE_PREFIX, 10, buffer)
        taken = faults() - before
    finally:
        os.close(fd)
    assert eof and bytes(got) == data and got.obj is buffer.obj
    return taken


def lazy_buffer() -> tuple:
    before = faults()
    lazy = capture.prefix_buffer(faulted=False)
    made = faults() - before
    before = faults()
    lazy[:1 << 20] = b"\x7f" * (1 << 20)
    return made, faults() - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    ns = parser.parse_args()
    read = [faulted_read() for _ in range(ns.reps)]
    lazy = [lazy_buffer() for _ in range(ns.reps)]
    thp = THP.read_text().strip() if THP.exists() else "unknown"
    print(f"transparent huge pages: {thp}")
    print(f"1 MiB core into a faulted buffer: {statistics.median(read)} faults (fresh pages: 256)")
    print(f"lazy {capture.CORE_PREFIX >> 20} MiB buffer made: {statistics.median(m for m, _ in lazy)} faults "
          f"(a bytearray's zeros: {capture.CORE_PREFIX >> 12})")
    print(f"1 MiB of it filled: {statistics.median(f for _, f in lazy)} faults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
