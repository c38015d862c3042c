"""Benchmark: the start-up of the program the kernel runs for every crash, without a crash.

The static forwarder as ``corepipe install`` builds it (``corepipe-forward --show``: exec, print, exit), beside
the Python launcher's start up to the handoff (``python -IS`` importing the handoff's module, as the launcher
does before it connects) and a bare ``python -IS -c pass``; alternating, medians of ``--reps`` runs each.

    sudo .venv/bin/python tests/bench/bench_startup.py [--reps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from corepipe.platform import launcher, static_forwarder  # noqa: E402


def run(argv: list) -> float:
    """Seconds from spawn to reap of ``argv`` (output to /dev/null, empty environment, as the kernel starts it)."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, {}, file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    os.waitpid(pid, 0)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        forwarder = Path(tmp, "corepipe-forward")
        forwarder.write_bytes(static_forwarder.build(f"{tmp}/forward.sock", f"{tmp}/corepipe"))
        forwarder.chmod(0o755)
        handoff = f"import sys; sys.path[:0] = {launcher.search_path()!r}; import corepipe.platform.forward"
        programs = {
            "static forwarder": [str(forwarder), "--show"],
            "python -IS, the handoff's imports": [sys.executable, "-IS", "-c", handoff],
            "python -IS -c pass": [sys.executable, "-IS", "-c", "pass"],
        }
        times: dict = {name: [] for name in programs}
        for _ in range(ns.reps):
            for name, argv in programs.items():
                times[name].append(run(argv))
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {ns.reps} alternating runs")
    for name, values in times.items():
        print(f"{name:<36} {statistics.median(values) * 1000:7.2f} ms  (p90 "
              f"{statistics.quantiles(values, n=10)[-1] * 1000:.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
