from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
import zstandard
from support import core_digest, cpus_allowed, need

from corepipe.platform.compress import STREAMING, compress_stream


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
    return result, zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(out.read_bytes()), out


@pytest.mark.parametrize("threads", [0, 2])
def test_round_trip_with_hash_and_sizes(tmp_path, threads: int) -> None:
    data = os.urandom(300_000) + b"\0" * 3_000_000 + b"text " * 100_000
    result, back, out = _run(data, tmp_path, threads=threads)
    assert back == data
    assert result.size == len(data) and result.complete and not result.truncated
    assert result.digest == core_digest(data)
    assert result.compressed_size == out.stat().st_size < len(data)


def test_truncates_at_limit(tmp_path) -> None:
    data = os.urandom(5_000_000)
    result, back, _ = _run(data, tmp_path, limit=1_234_567)
    assert result.truncated and not result.complete
    assert result.size == 1_234_567 and back == data[:1_234_567]
    assert result.digest == core_digest(data[:1_234_567])


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("limit", [None, 1_000_000])
def test_read_done_comes_once_before_the_frame_ends(tmp_path, threads: int, limit) -> None:
    """The kernel is let go when the input is read: before zstd's last flush writes the frame's end."""
    out = tmp_path / "out.zst"
    calls = []
    result, back, _ = _run(os.urandom(3_000_000), tmp_path, threads=threads, limit=limit,
                           read_done=lambda: calls.append(out.stat().st_size))
    assert len(calls) == 1
    assert result.complete == (limit is None) and len(back) == result.size
    assert calls[0] < out.stat().st_size  # at least the frame's last block came after


def test_core_of_exactly_the_limit_is_not_truncated(tmp_path) -> None:
    data = os.urandom(100_000)
    result, back, _ = _run(data, tmp_path, limit=100_000)
    assert result.complete and not result.truncated and back == data


def test_empty_input(tmp_path) -> None:
    result, back, _ = _run(b"", tmp_path)
    assert result.size == 0 and result.complete and back == b""


@pytest.mark.parametrize("threads", [-1, 1])
def test_buffer_reuse_over_many_reads(tmp_path, threads: int) -> None:
    """Far more data than the read buffer holds, so it is hashed, compressed and reused many times."""
    quarter = 6 << 20
    text = (b"the quick brown fox jumps over the lazy dog 0123456789\n" * (quarter // 55 + 1))[:quarter]
    data = os.urandom(quarter) + text + bytes(2 * quarter) + os.urandom(12345)
    result, back, out = _run(data, tmp_path, threads=threads)
    assert back == data
    assert result.digest == core_digest(data) and result.size == len(data)
    assert not zstandard.get_frame_parameters(out.read_bytes()[:18]).has_checksum  # the digest is the check


def test_write_failure_raises() -> None:
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        try:
            with os.fdopen(write_fd, "wb") as w:
                w.write(os.urandom(8 << 20))
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            compress_stream(read_fd, fd, threads=0)
    finally:
        os.close(fd)
        os.close(read_fd)
        feeder.join()


def test_zstd_backend_is_the_packages() -> None:
    from corepipe.platform import compress

    assert compress.zstd.ZstdCompressor is zstandard.ZstdCompressor


def test_workers_setting() -> None:
    from corepipe.platform.compress import workers

    assert workers(0) == 0 and workers(3) == 3
    cpus = len(os.sched_getaffinity(0))
    assert workers(-1) == min(cpus, 2)


@pytest.mark.parametrize("split", [0, 1, 1_500_000, 3_000_000])
def test_prefix_then_the_pipe(tmp_path, split: int) -> None:
    """capture.py's in-memory start of the core, continued from the fd: one stream, one hash."""
    data = os.urandom(1_000_000) + b"\0" * 2_000_000
    result, back, _ = _run(data[split:], tmp_path, prefix=data[:split])
    assert back == data and result.size == len(data) and result.complete
    assert result.digest == core_digest(data) and result.head == data[:len(result.head)]


def test_prefix_at_eof_never_reads_the_fd(tmp_path) -> None:
    data = os.urandom(2_500_000)
    result, back, _ = _run(b"not part of the core", tmp_path, prefix=memoryview(bytearray(data)), eof=True)
    assert back == data and result.complete and result.digest == core_digest(data)


@pytest.mark.parametrize("eof", [True, False])
def test_limit_inside_the_prefix(tmp_path, eof: bool) -> None:
    data = os.urandom(3_000_000)
    result, back, _ = _run(b"" if eof else b"more", tmp_path, prefix=data, eof=eof, limit=2_000_000)
    assert result.truncated and not result.complete and back == data[:2_000_000]
    whole, back, _ = _run(b"", tmp_path, prefix=data, eof=eof, limit=len(data))
    assert whole.complete and not whole.truncated and back == data


def test_no_block_is_split_after_compressible_data(tmp_path) -> None:
    """Without workers every block holds BLOCK input bytes: random data after zeros (a core's pages after
    its headers) is stored as raw blocks of that size, not pre-split by libzstd 1.5.7 at 3 bytes a block."""
    from corepipe.platform.compress import BLOCK

    data = bytes(200_000) + os.urandom(2_000_000)
    result, back, out = _run(data, tmp_path, threads=0)
    assert back == data
    frame = out.read_bytes()
    assert frame[4] & 0xE3 == 0  # no content size, not single-segment, no dict id: the header ends at 6
    pos = 6  # magic, frame header descriptor, window descriptor
    sizes = []
    while True:
        header = int.from_bytes(frame[pos:pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        sizes.append((kind, size))
        pos += 3 + (1 if kind == 1 else size)
        if header & 1:
            break
    raw = [size for kind, size in sizes if kind == 0]
    assert len(raw) >= 14 and all(size == BLOCK for size in raw[:-1]), sizes
    assert result.compressed_size < len(data) - 200_000 + 3 * len(sizes) + 1000


def _frames(path) -> list:
    """The sizes of the frames in a zstd file, one after the other (the file ends with the last)."""
    data, offset, sizes = path.read_bytes(), 0, []
    while offset < len(data):
        size = zstandard.frame_header_size(data[offset:offset + 18])
        end = offset + size
        while True:  # the blocks: 3-byte headers, an RLE block's one byte, other blocks their size
            header = int.from_bytes(data[end:end + 3], "little")
            kind, length = (header >> 1) & 3, header >> 3
            end += 3 + (1 if kind == 1 else length)
            if header & 1:
                break
        sizes.append(end - offset)
        offset = end
    return sizes


ZERO_CASES = {
    "middle": lambda: os.urandom(300_000) + bytes(5 << 20) + b"text " * 100_000,
    "runs": lambda: b"".join(os.urandom(70_000) + bytes(size) for size in (3 << 20, 100_000, 2 << 20, 1 << 20)),
    "at the end": lambda: b"text " * 50_000 + bytes(9 << 20),
    "past a flush": lambda: os.urandom(10_000) + bytes(70 << 20) + os.urandom(10_000),
    "short runs only": lambda: b"".join(os.urandom(50_000) + bytes(500_000) for _ in range(6)),
}


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("case", ZERO_CASES)
def test_zero_runs_as_frames_of_their_own(tmp_path, threads: int, case: str) -> None:
    """Runs of zeros of ZERO_RUN bytes or more are frames of RLE blocks; the file decompresses, with
    python-zstandard as with the zstd CLI, to the input; shorter runs stay in the data's frame."""
    from corepipe.platform.compress import ZERO_FRAME

    data = ZERO_CASES[case]()
    result, back, out = _run(data, tmp_path, threads=threads)
    assert back == data and result.size == len(data) and result.complete
    assert result.digest == core_digest(data) and result.compressed_size == out.stat().st_size
    cli = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
    assert cli == data
    frames, raw = _frames(out), out.read_bytes()
    assert sum(frames) == len(raw)
    zero_frames = raw.count(ZERO_FRAME)
    if case == "short runs only":
        assert len(frames) == 1 and zero_frames == 0
    else:
        assert zero_frames >= 1 and len(frames) >= 2
    if case == "past a flush":
        assert out.stat().st_size < 40_000  # 70 MiB of zeros in 4 bytes per 128 KiB, and 20 KB of random


def test_truncated_inside_a_zero_run(tmp_path) -> None:
    data = os.urandom(100_000) + bytes(8 << 20)
    result, back, out = _run(data, tmp_path, limit=3_000_000)
    assert result.truncated and result.size == 3_000_000 and back == data[:3_000_000]
    assert subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout == data[:3_000_000]


def test_rle_zeros_sizes() -> None:
    from corepipe.platform.compress import RLE_BLOCK, rle_zeros

    assert rle_zeros(0) == b""
    assert len(rle_zeros(RLE_BLOCK)) == 4 and len(rle_zeros(RLE_BLOCK + 1)) == 8
    assert rle_zeros(5) == ((5 << 3) | 2).to_bytes(3, "little") + b"\0"


def test_a_core_of_several_frames_passes_the_checks_that_read_it(tmp_path) -> None:
    """extract's copy and ship's StreamCheck read every frame, and the record's digest covers them all."""
    from corepipe.platform import unpack

    data = ZERO_CASES["runs"]()
    result, _back, out = _run(data, tmp_path, threads=2)
    assert len(_frames(out)) > 2
    record = {"id": "x", "core": {"size": result.size, "digest": result.digest}}
    copied = bytearray()
    with open(out, "rb") as f:
        assert unpack.copy(f.fileno(), record, copied.extend) == len(data)
    assert copied == data
    check = unpack.StreamCheck(record)
    raw = out.read_bytes()
    for offset in range(0, len(raw), 1000):
        check.update(raw[offset:offset + 1000])
    check.verify()
    with pytest.raises(unpack.CoreError, match="does not match"):
        short = unpack.StreamCheck(record)
        short.update(raw[:_frames(out)[0]])  # the first frame alone
        short.verify()


@pytest.mark.parametrize("zeros_first", [False, True])
def test_streaming_once_zstd_has_had_enough_and_workers_keep_their_cpus(tmp_path, zeros_first: bool) -> None:
    """The caller narrows its own CPUs in ``streaming``'s first call: zstd's threads, running by then, keep all
    of theirs, and no thread starts after it (it would inherit the one CPU)."""
    need(len(os.sched_getaffinity(0)) >= 2, "needs 2 CPUs: the test narrows a thread to one")
    mine = os.sched_getaffinity(0)
    before = set(os.listdir("/proc/self/task"))
    out = tmp_path / "out.zst"
    seen = []

    sizes = []

    def started(size: int) -> None:
        sizes.append(size)
        if len(sizes) == 1:
            seen.append((set(os.listdir("/proc/self/task")) - before, out.stat().st_size))
            os.sched_setaffinity(0, {min(mine)})

    def read_done() -> None:  # zstd's workers are still there: the last bytes are compressed after this
        threads = set(os.listdir("/proc/self/task")) - before
        seen.append((threads, {cpus_allowed(Path(f"/proc/self/task/{tid}/status")) for tid in threads}))

    data = (b"\0" * (3 << 20) if zeros_first else b"") + os.urandom(3_000_000) + b"text " * 400_000
    try:
        result, back, _ = _run(data, tmp_path, threads=2, streaming=started, read_done=read_done)
    finally:
        os.sched_setaffinity(0, mine)
    assert back == data and result.complete
    assert len(sizes) > 1 and sizes == sorted(sizes) and sizes[-1] == len(data)  # after each read, bytes read so far
    (at_start, size), (at_end, allowed) = seen
    assert len(at_start) >= 3  # the feeder and zstd's two workers
    assert size < out.stat().st_size  # called while the core was still being compressed
    assert at_end <= at_start and len(at_end) >= 2  # no thread started after it, zstd's workers still run
    assert str(min(mine)) not in allowed  # none was narrowed with the caller


@pytest.mark.parametrize(("threads", "size"), [(0, 3 * STREAMING), (2, STREAMING - 1)])
def test_no_streaming_call_without_workers_or_for_a_small_core(tmp_path, threads: int, size: int) -> None:
    calls = []
    result, back, _ = _run(os.urandom(size), tmp_path, threads=threads, streaming=calls.append)
    assert len(back) == size and result.complete and calls == []
