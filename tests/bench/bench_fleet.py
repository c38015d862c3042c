"""Benchmark: the fleet view over the index, 200 nodes, against SeaweedFS (S3) and Azurite on loopback.

Run from the worktree (not part of the pytest run)::

    .venv/bin/python tests/bench/bench_fleet.py [--crashes 10000,100000] [--nodes 200] [--days 5]
        [--servers seaweedfs,azure]

For each size, records are built by the collector's record builder and turned into index rows by the shipper's
row builder, then written through the shipper's own index writer (fleet.write_rows: one object per node and
dump day, so nodes x days objects). One crash's record object is uploaded too, for ``info``. Each command runs
as a child process (a fresh interpreter, as a user runs it), its wall time and peak RSS (GNU time's %M) and
its requests counted by a loopback proxy (objectstores.CountingProxy): ``list --remote --json`` and
``list --remote --group --json`` with an empty cache (cold) and again (warm, ``--repeat`` times: the median,
every run's seconds and the largest peak RSS), and ``info --remote NODE/ID`` warm. Printed as one JSON object
per line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "src"))

import objectstores  # noqa: E402

from corepipe.domain import fleet, fleet_index, record  # noqa: E402
from corepipe.domain.containers import Container  # noqa: E402
from corepipe.platform.kernel import KernelArgs  # noqa: E402
from corepipe.platform.objectstore import open_destination  # noqa: E402

SIGNATURES = 60
TIME = "/usr/bin/time"  # GNU time (Debian: time)


def rows_of(crashes: int, nodes: int, days: int, prefix: str) -> dict:
    """node -> index rows of ``crashes`` crashes spread over ``nodes`` and ``days``, 60 signatures."""
    start = int(time.time()) - days * 86400
    by_node: dict = {}
    for number in range(crashes):
        node = f"node-{number % nodes:04d}"
        crash = f"{number:012x}"
        when = start + number * days * 86400 // crashes
        container = Container(runtime="docker", id=f"{number % 997:064x}", name=f"task-{number % 997}",
                              image=f"registry.example/app{number % 7}:1.{number % 3}")
        rec = record.build(crash_id=crash, args=KernelArgs(pid=1000 + number % 30000, signal=11, time=when, uid=0,
                                                           comm=f"app{number % 7}"),
                           snapshot=None, container=container, redact_env=[], received=when + 0.25)
        site = number % SIGNATURES
        rec.update(status="complete", exe=f"/usr/bin/app{number % 7}", signature={
            "hash": f"{site:016x}", "text": f"app{number % 7} SIGSEGV: f{site} | g | main", "source": "backtrace",
            "algorithm": "corepipe-siggen", "version": 1, "site": f"site-{site}"})
        relative = ("docker", container.id, f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(when))}-{crash}")
        directory = "/".join([prefix, node, *relative])
        data = record.dumps(rec) if number == crashes - 1 else b"x" * 3000
        by_node.setdefault(node, []).append(fleet_index.row(rec, node, prefix, relative, {
            f"{directory}/record.json": len(data), f"{directory}/core.zst": 100000}))
        if number == crashes - 1:
            by_node["_sample"] = (node, crash, f"{directory}/record.json", data)
    return by_node


def child(argv: list, env: dict, proxy: objectstores.CountingProxy) -> dict:
    """Seconds, peak RSS (MiB) and requests of one corepipe command run as a child process."""
    proxy.counts.clear()
    start = time.monotonic()
    # GNU time (a small process) forks the command: a child forked from this benchmark, which holds the rows it
    # wrote, would count this process's pages in its own peak RSS until it execs.
    proc = subprocess.run([TIME, "-f", "%M", sys.executable, "-m", "corepipe", *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr[-500:]}")
    peak = int(proc.stderr.strip().splitlines()[-1])
    return {"seconds": round(seconds, 3), "rss_mib": round(peak / 1024, 1), "requests": proxy.total()}


def run(kind: str, crashes: int, nodes: int, days: int, workdir: Path, repeat: int) -> list:
    server = objectstores.make(kind, workdir)
    server.start()
    proxy = objectstores.CountingProxy(server.port)
    try:
        url = server.url("fleet")
        os.environ.update(server.env)
        destination = open_destination(url)
        by_node = rows_of(crashes, nodes, days, "fleet")
        node, crash, key, data = by_node.pop("_sample")
        destination.put_small(key, data, {})
        objects = 0
        started = time.monotonic()
        for name, rows in by_node.items():
            objects += len(fleet.write_rows(destination, name, rows))
        written = time.monotonic() - started
        if isinstance(server, objectstores.Azurite):
            env = {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string().replace(
                f"127.0.0.1:{server.port}", f"127.0.0.1:{proxy.port}")}
        else:
            env = {**server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        cache = workdir / "cache"
        env = {**os.environ, **env, "XDG_CACHE_HOME": str(cache)}
        config = workdir / "reader.toml"
        config.write_text(f'store = "{workdir / "none"}"\n')
        base = ["--config", str(config)]
        results = []

        def warm(name: str, argv: list) -> dict:
            runs = [child(base + argv, env, proxy) for _ in range(repeat)]
            times = sorted(r["seconds"] for r in runs)
            return {"command": name, "cache": "warm", **max(runs, key=lambda r: r["rss_mib"]),
                    "seconds": times[len(times) // 2], "runs": times}

        for name, argv in (("list --json", ["list", "--remote", url, "--json"]),
                           ("list --group", ["list", "--remote", url, "--group", "--json"])):
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            results.append({"command": name, "cache": "cold", **child(base + argv, env, proxy)})
            results.append(warm(name, argv))
        results.append(warm("info NODE/ID", ["info", "--remote", url, f"{node}/{crash}", "--json"]))
        for result in results:
            result.update(server=kind, crashes=crashes, nodes=nodes, index_objects=objects,
                          write_seconds=round(written, 2))
        return results
    finally:
        proxy.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crashes", default="10000,100000")
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--servers", default="seaweedfs,azure")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each warm command (the median is shown)")
    args = parser.parse_args()
    everything = []
    for kind in args.servers.split(","):
        for crashes in (int(c) for c in args.crashes.split(",")):
            with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
                for result in run(kind, crashes, args.nodes, args.days, Path(tmp), args.repeat):
                    print(json.dumps(result), flush=True)
                    everything.append(result)
    print(f"\n{'server':10} {'crashes':>8} {'objects':>7} {'command':14} {'cache':5} {'s':>8} {'requests':>8} "
          f"{'RSS MiB':>8}  warm runs")
    for r in everything:
        print(f"{r['server']:10} {r['crashes']:>8} {r['index_objects']:>7} {r['command']:14} {r['cache']:5} "
              f"{r['seconds']:>8.2f} {r['requests']:>8} {r['rss_mib']:>8}  {' '.join(map(str, r.get('runs', [])))}")


if __name__ == "__main__":
    main()
