"""Benchmark: ``corepipe ship`` of a 1 GiB crash to each loopback server against the SDK's own upload.

Run from the worktree (not part of the pytest run)::

    .venv/bin/python tests/bench/bench_ship.py [--size-mib 1024] [--rounds 3] [--servers azure,s3]

One crash with a 1 GiB incompressible core is filed the way the collector files it. For each server
(Azurite; moto's S3 server, tests/objectstores.py), each round uploads the same core.zst with the
SDK's one-shot call (Azure: ``BlobClient.upload_blob(max_concurrency=4)``, the shipper's concurrency;
S3: boto3's ``upload_file`` with its default transfer settings, 10 threads of 8 MiB parts) and ships
the crash with ``corepipe ship --once`` (binaries, core in verified parts, record, read-back
verification, shipped.json), in alternating order. Both run as child processes (a fresh interpreter
importing its SDK, as the vendor's CLI would), their wall time, CPU time and peak RSS from ``wait4``'s
rusage; throughputs are MiB/s of core.zst.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "src"))

import objectstores  # noqa: E402

from corepipe.platform.store import CORE, SHIPPED  # noqa: E402

MIB = 1 << 20


#: The SDK's one-shot upload, run as a child process like the shipper (a fresh interpreter that imports the SDK,
#: as the vendor's CLI would be): argv is the file, the container or bucket, the key.
SDK_UPLOAD = {
    "azurite": """
import os, sys
from azure.storage.blob import BlobServiceClient
blob = BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"]).get_blob_client(
    sys.argv[2], sys.argv[3])
with open(sys.argv[1], "rb") as f:
    blob.upload_blob(f, length=os.fstat(f.fileno()).st_size, overwrite=True, max_concurrency=4)
""",
    "moto": """
import sys, boto3
boto3.client("s3").upload_file(sys.argv[1], sys.argv[2], sys.argv[3])
""",
}


def child(argv: list, env: dict) -> tuple:
    """(seconds, CPU seconds, peak RSS in bytes) of one child process (``wait4``'s rusage)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed with {status}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def sdk_upload(server: objectstores.Server, source: Path, key: str) -> tuple:
    bucket = server.container if server.kind == "azurite" else server.bucket
    return child([sys.executable, "-c", SDK_UPLOAD[server.kind], str(source), bucket, key], server.env)


def ship(server: objectstores.Server, config: Path, prefix: str) -> tuple:
    return child([sys.executable, "-m", "corepipe", "--config", str(config), "ship", "--once", "--to",
                  server.url(prefix)], server.env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default="azure,s3")
    parser.add_argument("--json", default=str(TESTS / "bench" / "results-ship.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="corepipe-bench-ship-"))
    store = work / "store"
    path, rec = objectstores.stored_crash(store, args.size_mib * MIB)
    core = path / CORE
    size = core.stat().st_size
    config = work / "c.toml"
    config.write_text(f'store = "{store}"\nship_node = "bench"\n')
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_start": os.getloadavg(),
               "core_zst_bytes": size, "servers": {}}
    print(f"core.zst {size / MIB:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    for kind in args.servers.split(","):
        server = objectstores.make(kind, work)
        server.start()
        runs = []
        try:
            for n in range(args.rounds):
                order = ("sdk", "ship") if n % 2 == 0 else ("ship", "sdk")
                run: dict = {}
                for what in order:
                    if what == "sdk":
                        run["sdk_s"], run["sdk_cpu_s"], run["sdk_rss"] = sdk_upload(server, core, f"sdk-{n}/{CORE}")
                    else:
                        (path / SHIPPED).unlink(missing_ok=True)
                        run["ship_s"], run["ship_cpu_s"], run["ship_rss"] = ship(server, config, f"ship-{n}")
                runs.append(run)
                print(f"{kind} round {n}: sdk {size / MIB / run['sdk_s']:.0f} MiB/s, corepipe ship "
                      f"{size / MIB / run['ship_s']:.0f} MiB/s ({run['sdk_s'] / run['ship_s']:.2f}x), CPU "
                      f"{run['sdk_cpu_s']:.1f} s / {run['ship_cpu_s']:.1f} s, peak RSS "
                      f"{run['sdk_rss'] / MIB:.0f} / {run['ship_rss'] / MIB:.0f} MiB, load {os.getloadavg()[0]:.1f}",
                      flush=True)
        finally:
            server.stop()
        sdk = statistics.median(r["sdk_s"] for r in runs)
        shipped = statistics.median(r["ship_s"] for r in runs)
        results["servers"][kind] = {"runs": runs, "sdk_mib_s": size / MIB / sdk, "ship_mib_s": size / MIB / shipped,
                                    "ratio": sdk / shipped, "paired": statistics.median(r["sdk_s"] / r["ship_s"]
                                                                                        for r in runs),
                                    "sdk_cpu_s": statistics.median(r["sdk_cpu_s"] for r in runs),
                                    "ship_cpu_s": statistics.median(r["ship_cpu_s"] for r in runs),
                                    "peak_rss_mib": max(r["ship_rss"] for r in runs) / MIB}
        summary = results["servers"][kind]
        print(f"{kind}: median sdk {summary['sdk_mib_s']:.0f} MiB/s, corepipe ship {summary['ship_mib_s']:.0f} MiB/s "
              f"= {summary['ratio']:.2f}x (paired {summary['paired']:.2f}x), peak RSS {summary['peak_rss_mib']:.0f} "
              "MiB", flush=True)
    results["load_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1))
    subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
