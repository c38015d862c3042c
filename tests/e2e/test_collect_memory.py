"""The handler's memory does not grow with the core: a big crash through the real kernel stays under 64 MiB."""

from __future__ import annotations

import subprocess
from pathlib import Path

import xxhash
from support import crash, need_tool

from corepipe.platform.compress import ZERO_FRAME

MIB = 1 << 20
RSS_CEILING = 64 * MIB

def test_big_core_constant_memory(kernel_handler, crasher: Path, tmp_path: Path) -> None:
    crash([str(crasher), "256", "bigcore"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "bigcore", timeout=120)
    assert rec["status"] == "complete", rec["collector"]["errors"]
    core = rec["core"]
    assert core["stored"] is True and core["size"] > 256 * MIB
    peak = rec["collector"]["peak_rss"]
    assert 0 < peak < RSS_CEILING, f"handler peak RSS {peak / MIB:.1f} MiB for a {core['size'] / MIB:.0f} MiB core"
    assert 0 < rec["collector"]["cpu"] < rec["collector"]["duration"] * 4  # its zstd workers are 2 of its threads
    # The crasher's zero half went in as frames of RLE blocks of its own (compress._Output); the stored frames
    # hold the whole core: stream it back through the zstd CLI and compare the hash.
    assert (Path(rec["_dir"]) / "core.zst").read_bytes().count(ZERO_FRAME) >= 1

    digest = xxhash.xxh3_128()
    with subprocess.Popen([need_tool("zstd"), "-q", "-d", "-c", str(Path(rec["_dir"]) / "core.zst")],
                          stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(MIB):
            digest.update(chunk)
    assert proc.returncode == 0
    assert core["digest"] == {"algorithm": "xxh3-128", "value": digest.hexdigest()}
