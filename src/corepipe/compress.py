"""Stream a core from a pipe through zstd into a file, hashing the uncompressed bytes on the way.

Memory is bounded by one read buffer plus zstd's own window and worker buffers,
whatever the core's size.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import zstandard

CHUNK = 1 << 20
#: How much of the start of the core is kept in ``CoreResult.head`` (ELF and program headers).
HEAD = 256 << 10
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
    #: The first HEAD uncompressed bytes, to check the core against its ELF program headers.
    head: bytes = b""


class OutputTooLarge(OSError):
    """The compressed core grew past ``max_output``: the space it was given."""


class _Budget:
    """A file-like target that refuses to grow past ``limit`` bytes unless ``grow(needed, written)`` gives more."""

    def __init__(self, raw: object, limit: int, grow: Optional[Callable[[int, int], int]]):
        self.raw, self.limit, self.grow, self.written = raw, limit, grow, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.limit and self.grow is not None:
            self.limit = max(self.limit, self.grow(self.written + len(data), self.written))
        if self.written + len(data) > self.limit:
            raise OutputTooLarge(f"the compressed core needs more than the {self.limit} bytes it has room for")
        self.written += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe so each read returns up to a megabyte instead of 64 KiB."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass


def compress_stream(source_fd: int, target_fd: int, *, limit: Optional[int] = None, level: int = 3,
                    threads: int = -1, max_output: Optional[int] = None,
                    grow: Optional[Callable[[int, int], int]] = None) -> CoreResult:
    """Copy ``source_fd`` to ``target_fd`` as one zstd frame; raises OSError on a write failure and
    OutputTooLarge when the compressed bytes would pass ``max_output`` (and ``grow`` gives no more)."""
    result = CoreResult()
    digest = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    head = bytearray()
    with open(target_fd, "wb", buffering=0, closefd=False) as raw, \
            compressor.stream_writer(raw if max_output is None else _Budget(raw, max_output, grow), closefd=False,
                                     write_size=CHUNK) as writer:
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
            if len(head) < HEAD:
                head += chunk[:HEAD - len(head)]
            digest.update(chunk)
            writer.write(chunk)
            result.size += n
    result.compressed_size = os.fstat(target_fd).st_size
    result.sha256 = digest.hexdigest()
    result.head = bytes(head)
    return result
