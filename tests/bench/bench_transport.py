"""Benchmark: the kernel's coredump socket against its pipe as the transport of one core, nothing else.

Why serve on the coredump socket is slower at 1 GiB than the same worker fed by a pipe (docs/performance.md):
each round crashes the 1 GiB crasher once per transport, alternating, and one reader in this process
compresses the core with ``compress_stream`` (2 zstd workers, no affinity change, no store) from
- ``socket``: the kernel's coredump socket (pattern ``@<sock>``), read as serve's worker reads it;
- ``socket-lowat``: the same with SO_RCVLOWAT 64 KiB (fewer, larger reads);
- ``socket-wmem``: the same with ``net.core.wmem_default`` raised to 4 MiB for that crash: the kernel makes its end
  of the socket with ``sock_create_kern`` in init_net, so its send buffer is that default (212992 bytes), against
  the 1 MiB pipe (``ss -xm`` shows it as ``tb``); the old value is put back after the crash, and on any exit;
- ``pipe``: the kernel's pipe, handed over by the static forwarder as in pipe mode with serve running.
Per crash: crash-to-reap (SIGCONT to the parent's wait), the reader's CPU (zstd's workers included), its
reads, how often the crashed task and the reading thread slept (voluntary context switches: the task blocks
when the send buffer is full), and the crashed task's system time (the kernel writing the core, plus ~0.45 s of
filling its heap before the clock starts, the same for every transport). Medians; under the tests' kernel-settings lock.

    sudo .venv/bin/python tests/bench/bench_transport.py [--rounds 7] [--variants socket,socket-lowat,socket-wmem,pipe]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent / "src")]
from support import KernelSettings  # noqa: E402

from corepipe.platform import compress, forward, static_forwarder  # noqa: E402
from corepipe.platform.kernel import build_pattern  # noqa: E402

LOWAT = 64 << 10
WMEM_DEFAULT = Path("/proc/sys/net/core/wmem_default")
WMEM = 4 << 20
VARIANTS = ("socket", "socket-lowat", "socket-wmem", "pipe")


class Reader:
    """The receiving end of both transports, counting its reads."""

    def __init__(self, d: Path):
        self.d, self.reads = d, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(d / "core.sock"))
        self.sock.listen(4)
        self.handoffs = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.handoffs.bind(str(d / "forward.sock"))
        self.handoffs.listen(4)
        readv = os.readv

        def counting(fd: int, buffers: list) -> int:
            self.reads += 1
            return readv(fd, buffers)

        os.readv = counting  # compress.py reads with os.readv

    def core_fd(self, variant: str) -> int:
        if variant == "pipe":
            conn, _ = self.handoffs.accept()
            with conn:
                _message, fds, _flags, _addr = socket.recv_fds(conn, forward.MAX_MESSAGE, forward.MAX_FDS)
                conn.send(forward.ACCEPT)
                conn.recv(16)
            for fd in fds[1:]:
                os.close(fd)
            return fds[0]
        conn, _ = self.sock.accept()
        if variant == "socket-lowat":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, LOWAT)
        return conn.detach()

    def read(self, variant: str, out: dict) -> None:
        fd = self.core_fd(variant)
        target = os.open(self.d / "core.zst", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        before, slept = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        try:
            out["size"] = compress.compress_stream(fd, target).size
        finally:
            os.close(fd)
            os.close(target)
        after = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        out["reader_cs"] = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - slept


def crash(crasher: Path, reader: Reader, variant: str) -> dict:
    pid = os.posix_spawn(str(crasher), [str(crasher), "1024", "crasher", str(int(signal.SIGSTOP))], {})
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    out: dict = {}
    reader.reads = 0
    thread = threading.Thread(target=reader.read, args=(variant, out))
    thread.start()
    start = time.monotonic()
    os.kill(pid, signal.SIGCONT)
    _, _, usage = os.wait4(pid, 0)
    out["wall"] = time.monotonic() - start
    thread.join()
    out["reads"], out["task_sys"], out["task_cs"] = reader.reads, usage.ru_stime, usage.ru_nvcsw
    assert out["size"] >= 1 << 30, out
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    ns = parser.parse_args()
    variants = ns.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="cpt-transport.") as tmp:
        d = Path(tmp)
        crasher = d / "crasher"
        subprocess.run(["gcc", "-O0", "-static", "-o", str(crasher), str(TESTS / "crasher.c")], check=True)
        forwarder = d / "f"
        forwarder.write_bytes(static_forwarder.build(str(d / "forward.sock"), str(d / "absent")))
        forwarder.chmod(0o755)
        reader = Reader(d)
        patterns = {"pipe": build_pattern(str(forwarder)), "socket": f"@{d}/core.sock",
                    "socket-lowat": f"@{d}/core.sock", "socket-wmem": f"@{d}/core.sock"}
        results: dict = {v: [] for v in variants}
        print(f"load average at the start {os.getloadavg()}", flush=True)
        with KernelSettings() as settings:
            wmem = WMEM_DEFAULT.read_text().strip()
            settings.undo_on_abort(["sysctl", "-qw", f"net.core.wmem_default={wmem}"])
            for n in range(ns.rounds):
                for variant in variants[n % len(variants):] + variants[:n % len(variants)]:
                    settings.set(patterns[variant], pipe_limit=64)
                    try:
                        if variant == "socket-wmem":
                            WMEM_DEFAULT.write_text(str(WMEM))
                        got = crash(crasher, reader, variant)
                    finally:
                        WMEM_DEFAULT.write_text(wmem)
                    results[variant].append(got)
                    print(f"{n} {variant:<13} {got['wall']:.3f} s, reader cpu {got['cpu']:.3f} s, {got['reads']} reads,"
                          f" task system {got['task_sys']:.3f} s, slept: task {got['task_cs']}, reader"
                          f" {got['reader_cs']}", flush=True)
        print(f"load average at the end {os.getloadavg()}")
    base = statistics.median(r["wall"] for r in results.get("pipe", results[variants[0]]))
    print(f"{'transport':<13} {'crash-to-reap':>13} {'x pipe':>7} {'reader cpu':>10} {'reads':>7} {'task sys':>8}"
          f" {'task slept':>10} {'reader slept':>12}")
    for variant, rows in results.items():
        wall, cpu, reads, task, task_cs, reader_cs = (statistics.median(r[k] for r in rows) for k in (
            "wall", "cpu", "reads", "task_sys", "task_cs", "reader_cs"))
        print(f"{variant:<13} {wall:>11.3f} s {wall / base:>7.2f} {cpu:>8.3f} s {reads:>7.0f} {task:>6.3f} s"
              f" {task_cs:>10.0f} {reader_cs:>12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
