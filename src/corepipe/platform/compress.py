"""Stream a core from a pipe through zstd into a file, hashing the uncompressed bytes on the way.

Memory is bounded whatever the core's size: one read buffer plus zstd's window and worker
buffers (``JOB_SIZE`` jobs). The digest (digest.py, XXH3-128: ~0.05 s of CPU per GiB here) is
computed in the reading thread on the same buffer, and it is the core's one integrity check: the frame
carries no zstd checksum of its own (see ``compressor``). Measured choices are in the README, "Performance".
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from corepipe.platform import digest

CHUNK = 1 << 20
#: zstd's multi-threaded job size. With 2 workers, libzstd's own (8 MiB at level 3) took the handler to
#: 91 MiB and 4 MiB jobs to 79; 2 MiB jobs keep it near 50 MiB, and 1 MiB jobs (37 MiB) were slower.
JOB_SIZE = 2 << 20
#: How much of the window each job reloads from the one before (zstd's overlap_log): 4 is 1/32 of it, 64 KiB.
#: Loading the overlap fills zstd's hash tables at every position; at libzstd's default for level 3 (6, 256
#: KiB) that was 12% of the handler's CPU with 2 MiB jobs. Measured with 2 workers from memory (README):
#: 0.1 s less CPU per GiB, and the compressed cores within 0.004% of the default's.
OVERLAP_LOG = 4
#: Workers at most for ``compression_threads = -1``: each adds ~7 MiB, and two already compress faster
#: than the kernel fills the pipe.
MAX_WORKERS = 2
#: With no zstd workers the input goes in as blocks of this many bytes, each ended by FLUSH_BLOCK: just
#: under zstd's 128 KiB block maximum, so libzstd 1.5.7's pre-splitter (it splits full 128 KiB blocks
#: once a frame has saved bytes, and python-zstandard cannot turn it off) never cuts a block in two.
#: On a core's random pages after its compressible headers that split cost 3 bytes per 128 KiB: the
#: 1 GiB benchmark core was 4.7 KB larger than the zstd 1.5.4 CLI's and is now 2.9 KB smaller.
BLOCK = (128 << 10) - 1
#: Bytes compressed before ``compress_stream`` calls ``streaming``: a smaller core is read before moving a
#: thread to another CPU would pay off.
STREAMING = 4 << 20
#: How much of the start of the core is kept in ``CoreResult.head`` (ELF and program headers).
HEAD = 256 << 10


def _zstd_backend() -> object:
    """zstandard's C backend, loaded without the package's ``__init__``.

    The package's ``__init__`` picks a backend by importing ``platform`` (and ``typing``),
    a few ms paid by every crash; the C backend is what it picks on CPython and holds the
    whole API used here. Falls back to the package wherever that backend is not found.
    """
    from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec

    name = "zstandard.backend_c"
    if name in sys.modules:
        return sys.modules[name]
    if sys.implementation.name == "cpython":
        for directory in sys.path:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(directory or ".", "zstandard", "backend_c" + suffix)
                if os.path.isfile(path):
                    loader = ExtensionFileLoader(name, path)
                    module = loader.create_module(ModuleSpec(name, loader, origin=path))
                    loader.exec_module(module)
                    sys.modules[name] = module
                    return module
            if os.path.isdir(os.path.join(directory or ".", "zstandard")):
                break  # the package `import zstandard` would use has no C backend
    import zstandard

    return zstandard


zstd = _zstd_backend()


@dataclass
class CoreResult:
    #: Uncompressed bytes stored (after truncation), and compressed bytes written.
    size: int = 0
    compressed_size: int = 0
    #: The record's ``core.digest`` of the uncompressed bytes stored.
    digest: Optional[dict] = None
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


def workers(threads: int) -> int:
    """zstd worker threads for the ``compression_threads`` setting; -1 picks by the CPUs this process may use.

    One per CPU, up to MAX_WORKERS, like the zstd CLI's ``-T0``. With the digest cheap, zstd is
    the handler's work; on a busy host the scheduler shares the CPUs per thread (a kernel-started
    handler is in no autogroup), and a handler compressing in its reading thread alone got half
    the share the CLI's three threads got (README, "Performance").
    """
    if threads >= 0:
        return threads
    return min(len(os.sched_getaffinity(0)), MAX_WORKERS)


def compressor(level: int = 3, threads: int = -1) -> object:
    """A zstd compressor whose memory does not grow with the input (a frame for each run of data, see
    ``_Output``).

    No frame checksum: the record's digest (XXH3-128, of the same bytes) is what ``extract``, ``debug`` and
    ``ship`` verify, and zstd's XXH64 of a frame with workers is computed job by job in order, under a lock
    the workers share: 0.2 s of CPU per GiB (13%) in the benchmark's core, and as much wall time."""
    threads = workers(threads)
    options = {"threads": threads, "write_checksum": 0}
    if threads:
        options["job_size"] = JOB_SIZE
        options["overlap_log"] = OVERLAP_LOG
    return zstd.ZstdCompressor(compression_params=zstd.ZstdCompressionParameters.from_level(level, **options))


#: Reads of nothing but zeros that add up to this many bytes in a row go into the file as a zstd frame of
#: RLE blocks of their own (``_Output``); shorter runs are compressed with the data around them.
ZERO_RUN = 1 << 20
#: Input bytes per RLE block: the 128 KiB window the zero frames declare (RFC 8878: a block is at most that).
RLE_BLOCK = 128 << 10
#: A zero frame's header: magic, a descriptor with no content size, checksum or dictionary (0x00), and the
#: window descriptor for 128 KiB (exponent 7: 2**(10+7)).
ZERO_FRAME = b"\x28\xb5\x2f\xfd\x00\x38"
#: A block header: bit 0 last block, bits 1-2 the type (0 raw, 1 RLE), bits 3-23 the size; an RLE block is its
#: header and the byte it repeats.
_RLE = 1 << 1
_LAST_EMPTY_BLOCK = (1).to_bytes(3, "little")  # a raw block of 0 bytes ends the frame
#: Zeros a zero frame holds back at most before writing their blocks (4 bytes per 128 KiB).
_ZERO_FLUSH = 64 << 20
_ZEROS = bytes(CHUNK)


def _zero_block(size: int) -> bytes:
    """One RLE block, not the last, of ``size`` (at most RLE_BLOCK) zero bytes."""
    return ((size << 3) | _RLE).to_bytes(3, "little") + b"\0"


_FULL_ZERO_BLOCK = _zero_block(RLE_BLOCK)


def rle_zeros(size: int) -> bytes:
    """RLE blocks (none of them last) for ``size`` zero bytes."""
    full, rest = divmod(size, RLE_BLOCK)
    return _FULL_ZERO_BLOCK * full + (_zero_block(rest) if rest else b"")


class _Output:
    """What goes into the file: data through the zstd stream writer, and runs of zeros as frames of RLE blocks.

    A core's zero pages (memory mapped but never written: the kernel sends them as zeros to a pipe or a
    socket) cost zstd about as much CPU as text, 0.6 s per GiB of zeros here, while a frame of RLE blocks
    costs nothing to write and stores them in the 4 bytes per 128 KiB zstd gives them. The file is then
    several frames one after the other, which zstd and python-zstandard decompress as one stream.
    Without workers the writer gets the data in blocks of BLOCK bytes (see BLOCK)."""

    def __init__(self, writer: object, target: object, blocks: bool):
        self.writer, self.target, self.blocks = writer, target, blocks
        self.filled = 0  # input bytes in zstd's current block (without workers)
        self.zeros = 0  # zero bytes read and not written yet
        self.zero_frame = False  # a zero frame is open in the file
        self.compressed = 0  # bytes given to the writer

    def write(self, data: memoryview) -> None:
        """``data``: one read, at most CHUNK bytes."""
        if _ZEROS.startswith(data):
            self.zeros += len(data)
            if self.zero_frame and self.zeros >= _ZERO_FLUSH:
                self.target.write(rle_zeros(self.zeros))
                self.zeros = 0
            elif not self.zero_frame and self.zeros >= ZERO_RUN:
                self.writer.flush(zstd.FLUSH_FRAME)
                self.filled = 0
                self.target.write(ZERO_FRAME)
                self.zero_frame = True
            return
        self.end_zeros()
        self._compress(data)

    def end_zeros(self) -> None:
        """Write the zeros held back: as the end of the open zero frame, or compressed with the data."""
        if self.zero_frame:
            self.target.write(rle_zeros(self.zeros) + _LAST_EMPTY_BLOCK)
            self.zero_frame = False
        else:
            while self.zeros:
                take = min(self.zeros, CHUNK)
                self._compress(memoryview(_ZEROS)[:take])
                self.zeros -= take
        self.zeros = 0

    def _compress(self, data: memoryview) -> None:
        self.compressed += len(data)
        if not self.blocks:
            self.writer.write(data)  # with workers, a block flush would end a job
            return
        while data:
            take = min(len(data), BLOCK - self.filled)
            self.writer.write(data[:take])
            self.filled += take
            data = data[take:]
            if self.filled == BLOCK:
                self.writer.flush(zstd.FLUSH_BLOCK)
                self.filled = 0


class _Source:
    """The input: ``prefix`` (bytes already read from the pipe, see capture.py), then ``fd`` unless
    ``eof`` says the prefix was all of it.

    From a socket (``corepipe serve``: the kernel's coredump connection) too a read returns what is
    there. An AF_UNIX stream holds only what the kernel's sending buffer allows (~200 KB here), and
    recv with MSG_WAITALL (wait for a whole CHUNK) woke this process for about every page the kernel
    sent: draining a 1 GiB core took 118-130 thousand context switches against 52-54 thousand with
    plain reads. Through the server, 1 GiB took 1.98-2.16 s with MSG_WAITALL, 1.23-1.81 s with a thread
    receiving into a ring of four buffers ahead of the compressor, and 1.15-1.43 s (7 runs, median 1.33)
    with plain reads, the zstd CLI as a pipe handler 0.97-1.25 s (load average 1.6-2.4; README).
    """

    def __init__(self, fd: int, prefix: bytes, eof: bool):
        self.fd, self.prefix, self.eof, self.offset = fd, memoryview(prefix), eof, 0

    def readinto(self, view: memoryview) -> int:
        if self.offset < len(self.prefix):
            n = min(len(view), len(self.prefix) - self.offset)
            view[:n] = self.prefix[self.offset:self.offset + n]
            self.offset += n
            return n
        if self.eof:
            return 0
        return os.readv(self.fd, [view])


def compress_stream(source_fd: int, target_fd: int, *, limit: Optional[int] = None, level: int = 3,
                    threads: int = -1, max_output: Optional[int] = None,
                    grow: Optional[Callable[[int, int], int]] = None, prefix: bytes = b"",
                    eof: bool = False, read_done: Optional[Callable[[], None]] = None,
                    streaming: Optional[Callable[[int], None]] = None) -> CoreResult:
    """Copy ``prefix`` and then ``source_fd`` (not read if ``eof``) to ``target_fd`` as one zstd frame; raises
    OSError on a write failure and OutputTooLarge when the compressed bytes would pass ``max_output`` (and
    ``grow`` gives no more).

    ``read_done`` is called once the input is read (to its end, or to ``limit``) and before zstd's last
    flush: the kernel can be let go while the last bytes are still being compressed. ``streaming`` is called
    after each read, with the bytes read so far, once STREAMING bytes went to zstd's workers (libzstd starts them
    with the first), and never without workers: from then on the caller may narrow this thread's CPUs
    (affinity.py) without them inheriting it."""
    return _compress(_Source(source_fd, prefix, eof), target_fd, limit=limit, level=level, threads=threads,
                     max_output=max_output, grow=grow, read_done=read_done, streaming=streaming)


def _compress(source: _Source, target_fd: int, *, limit: Optional[int], level: int, threads: int,
              max_output: Optional[int], grow: Optional[Callable[[int, int], int]],
              read_done: Optional[Callable[[], None]],
              streaming: Optional[Callable[[int], None]]) -> CoreResult:
    result = CoreResult()
    view = memoryview(bytearray(CHUNK))
    hasher = digest.new()
    head = bytearray()
    with open(target_fd, "wb", buffering=0, closefd=False) as raw:
        target = raw if max_output is None else _Budget(raw, max_output, grow)
        with compressor(level, threads).stream_writer(target, closefd=False, write_size=CHUNK) as writer:
            output = _Output(writer, target, blocks=not workers(threads))
            streaming = streaming if not output.blocks else None
            while True:
                want = CHUNK if limit is None else min(CHUNK, limit - result.size)
                if want <= 0:
                    # At the limit: a core of exactly ``limit`` bytes is complete, not truncated.
                    result.complete = source.readinto(memoryview(bytearray(1))) == 0
                    result.truncated = not result.complete
                    break
                n = source.readinto(view[:want])
                if n == 0:
                    result.complete = True
                    break
                if len(head) < HEAD:
                    head += view[:min(n, HEAD - len(head))]
                hasher.update(view[:n])
                output.write(view[:n])  # zstd has copied the bytes when this returns
                result.size += n
                if streaming is not None and output.compressed >= STREAMING:
                    streaming(result.size)
            if read_done is not None:
                read_done()
            output.end_zeros()
    result.digest = digest.as_stated(hasher)
    result.compressed_size = os.fstat(target_fd).st_size
    result.head = bytes(head)
    return result
