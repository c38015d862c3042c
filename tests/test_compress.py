"""compress_stream on real pipes: the stored frame, its hash, truncation, failures, and the lean collect path."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zstandard
from support import need_tool

from corepipe import compress, launcher

MIB = 1 << 20


def core_like(size: int) -> bytes:
    """A quarter random, a quarter text, half zeros: the crasher's mix."""
    quarter = size // 4
    text = (b"the quick brown fox jumps over the lazy dog 0123456789\n" * (quarter // 55 + 1))[:quarter]
    return os.urandom(quarter) + text + bytes(size - 2 * quarter)


def feed(data: bytes) -> int:
    """The read end of a pipe a thread writes ``data`` into (as the kernel does) and then closes."""
    r, w = os.pipe()

    def writer() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view[: 1 << 16]):]
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    threading.Thread(target=writer, daemon=True).start()
    return r


def run(tmp_path: Path, data: bytes, **kwargs) -> tuple:
    source = feed(data)
    target = tmp_path / "core.zst"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        compress.widen_pipe(source)
        result = compress.compress_stream(source, fd, **kwargs)
    finally:
        os.close(fd)
        os.close(source)
    return result, target


@pytest.mark.parametrize("threads", [0, 2, -1])
def test_round_trip_hash_and_size(tmp_path: Path, threads: int) -> None:
    data = core_like(24 * MIB + 12345)
    result, target = run(tmp_path, data, threads=threads)
    assert result.complete and not result.truncated
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.compressed_size == target.stat().st_size < len(data) // 2
    out = tmp_path / "core"
    # zstd -d verifies the frame's checksum too.
    subprocess.run([need_tool("zstd"), "-q", "-d", "-f", str(target), "-o", str(out)], check=True)
    assert out.read_bytes() == data


def test_one_frame_with_checksum(tmp_path: Path) -> None:
    _, target = run(tmp_path, core_like(3 * MIB))
    params = zstandard.get_frame_parameters(target.read_bytes()[:18])
    assert params.has_checksum


@pytest.mark.parametrize("extra", [0, 1, 5 * MIB])
def test_limit(tmp_path: Path, extra: int) -> None:
    limit = 2 * MIB + 7
    data = core_like(limit + extra)
    result, target = run(tmp_path, data, limit=limit)
    assert result.size == limit
    assert result.truncated is (extra > 0) and result.complete is (extra == 0)
    assert result.sha256 == hashlib.sha256(data[:limit]).hexdigest()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(target.read_bytes()) == data[:limit]


def test_write_failure_raises_and_stops_the_hashing_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    source = feed(core_like(8 * MIB))
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            compress.compress_stream(source, fd, threads=0)
    finally:
        os.close(fd)
        os.close(source)
    assert not [t for t in threading.enumerate() if t.name == "sha256"]
    assert threading.active_count() <= before + 1  # at most the feeding thread, which ends on EPIPE


def test_zstd_backend_is_the_packages() -> None:
    assert compress.zstd.ZstdCompressor is zstandard.ZstdCompressor


def test_collect_path_imports_stay_lean(tmp_path: Path) -> None:
    """The kernel's handler must not pay for the package's backend probe, argparse or psutil."""
    script = tmp_path / "h"
    script.write_text(launcher.script().replace("from corepipe.cli import main\nraise SystemExit(main())\n", (
        "from corepipe.commands import collect_cmd\nfrom corepipe import compress\n"
        "print(' '.join(sorted(sys.modules)))\n")))
    script.chmod(0o755)
    loaded = set(subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout.split())
    assert "corepipe.compress" in loaded and "zstandard.backend_c" in loaded
    unwanted = loaded & {"platform", "zstandard", "argparse", "psutil", "site"}
    assert not unwanted, unwanted


def test_launcher_runs_without_site(tmp_path: Path) -> None:
    script = tmp_path / "corepipe"
    script.write_text(launcher.script())
    script.chmod(0o755)
    assert script.read_text().startswith(f"#!{sys.executable} -IS\n")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, env={})
    assert proc.returncode == 0 and "corepipe" in proc.stdout, proc.stderr
