from __future__ import annotations

import hashlib
import os
import threading

import pytest
import zstandard

from corepipe.compress import compress_stream


def _run(data: bytes, tmp_path, **kwargs):
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            try:
                w.write(data)
            except BrokenPipeError:
                pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = tmp_path / "out.zst"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        result = compress_stream(read_fd, fd, **kwargs)
    finally:
        os.close(fd)
        os.close(read_fd)
        feeder.join()
    return result, zstandard.ZstdDecompressor().decompressobj().decompress(out.read_bytes()), out


@pytest.mark.parametrize("threads", [0, 2])
def test_round_trip_with_hash_and_sizes(tmp_path, threads: int) -> None:
    data = os.urandom(300_000) + b"\0" * 3_000_000 + b"text " * 100_000
    result, back, out = _run(data, tmp_path, threads=threads)
    assert back == data
    assert result.size == len(data) and result.complete and not result.truncated
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.compressed_size == out.stat().st_size < len(data)


def test_truncates_at_limit(tmp_path) -> None:
    data = os.urandom(5_000_000)
    result, back, _ = _run(data, tmp_path, limit=1_234_567)
    assert result.truncated and not result.complete
    assert result.size == 1_234_567 and back == data[:1_234_567]
    assert result.sha256 == hashlib.sha256(data[:1_234_567]).hexdigest()


def test_core_of_exactly_the_limit_is_not_truncated(tmp_path) -> None:
    data = os.urandom(100_000)
    result, back, _ = _run(data, tmp_path, limit=100_000)
    assert result.complete and not result.truncated and back == data


def test_empty_input(tmp_path) -> None:
    result, back, _ = _run(b"", tmp_path)
    assert result.size == 0 and result.complete and back == b""
