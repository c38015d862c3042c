"""Stream a core from a pipe through zstd into a file, hashing the uncompressed bytes on the way.

Memory is bounded by one read buffer plus zstd's own window and worker buffers,
whatever the core's size.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import zstandard

CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


@dataclass
class CoreResult:
    #: Uncompressed bytes stored (after truncation), and compressed bytes written.
    size: int = 0
    compressed_size: int = 0
    sha256: str = ""
    #: True when the core was cut at ``limit``; ``complete`` when the input was read to its end.
    truncated: bool = False
    complete: bool = False


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe so each read returns up to a megabyte instead of 64 KiB."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass


def compress_stream(source_fd: int, target_fd: int, *, limit: Optional[int] = None, level: int = 3,
                    threads: int = -1) -> CoreResult:
    """Copy ``source_fd`` to ``target_fd`` as one zstd frame; raises OSError on a write failure."""
    result = CoreResult()
    digest = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(target_fd, "wb", buffering=0, closefd=False) as raw, \
            compressor.stream_writer(raw, closefd=False, write_size=CHUNK) as writer:
        while True:
            want = CHUNK if limit is None else min(CHUNK, limit - result.size)
            if want <= 0:
                # At the limit: a core of exactly ``limit`` bytes is complete, not truncated.
                result.complete = os.read(source_fd, 1) == b""
                result.truncated = not result.complete
                break
            n = os.readv(source_fd, [view[:want]])
            if n == 0:
                result.complete = True
                break
            chunk = view[:n]
            digest.update(chunk)
            writer.write(chunk)
            result.size += n
    result.compressed_size = os.fstat(target_fd).st_size
    result.sha256 = digest.hexdigest()
    return result
