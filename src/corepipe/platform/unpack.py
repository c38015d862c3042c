"""Decompress a stored core, checking it against the size and digest in its record (digest.py).

Used by ``extract``, ``debug``, the collection-time backtrace and ``ship`` (StreamCheck). A core that does not
decompress, or whose bytes differ from what was recorded, raises CoreError: the check is
the whole point of keeping the hash, so a mismatch is never passed off as a good core.
"""

from __future__ import annotations

import os
from typing import Callable

from corepipe.platform import digest
from corepipe.platform.errors import UserError
from corepipe.platform.fs import write_all
from corepipe.platform.store import core_file

CHUNK = 1 << 20


class CoreError(UserError):
    """The core is absent, unreadable or not what the record says; the message says which."""


def open_core(crash_path: str, record: dict) -> int:
    """An fd on the core the record names (``core.zst`` or ``core.partial.zst``), never through a symlink;
    CoreError when the record or disk says no core."""
    core = record.get("core") or {}
    name = core_file(record)
    if not core.get("stored") or name is None:
        raise CoreError(f"crash {record.get('id')} has no core ({core.get('reason') or 'not stored'})")
    try:
        return os.open(os.path.join(crash_path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CoreError(f"the core of crash {record.get('id')} is missing ({crash_path}/{name} was removed)") from None
    except OSError as exc:
        raise CoreError(f"cannot open {crash_path}/{name}: {exc.strerror}") from None


def _hasher(record: dict) -> tuple:
    """(hasher, expected hex) for the digest the record states; CoreError when it states none this version knows."""
    stated = digest.stated(record.get("core") or {})
    if stated is None:
        raise CoreError(f"the record of crash {record.get('id')} states no digest of its core, so it cannot be checked")
    algorithm, expected = stated
    try:
        return digest.new(algorithm), expected
    except KeyError:
        raise CoreError(f"the core of crash {record.get('id')} has a {algorithm!r} digest, which this corepipe "
                        f"cannot check; use a newer corepipe") from None


def _check(record: dict, size: int, hasher: object, expected: str) -> None:
    core = record.get("core") or {}
    value = hasher.hexdigest()  # type: ignore[attr-defined]
    if size != core.get("size") or value != expected:
        algorithm = digest.stated(core)[0]  # type: ignore[index]
        raise CoreError(f"the core of crash {record.get('id')} does not match its record: "
                        f"{size} bytes, {algorithm} {value[:16]}..., expected {core.get('size')} bytes, "
                        f"{algorithm} {expected[:16]}...")


class StreamCheck:
    """Checks a stored core from its compressed bytes, fed in order by ``update`` (the shipper's reads for
    its upload), against the record's size and digest; ``verify`` raises CoreError on a mismatch. Memory is
    bounded: the decompressed bytes go by in CHUNK pieces, whatever the ratio."""

    def __init__(self, record: dict):
        import zstandard

        self.record = record
        self.hasher, self.expected = _hasher(record)
        self.size = 0
        self._error = zstandard.ZstdError
        self._writer = zstandard.ZstdDecompressor().stream_writer(self, write_size=CHUNK)

    def write(self, data: bytes) -> int:
        """The decompressor's output (stream_writer's sink)."""
        self.hasher.update(data)  # type: ignore[attr-defined]
        self.size += len(data)
        return len(data)

    def update(self, compressed: bytes) -> None:
        try:
            self._writer.write(compressed)
        except self._error as exc:
            raise CoreError(f"the core of crash {self.record.get('id')} is corrupt: {exc}") from None

    def verify(self) -> None:
        self._writer.flush()
        _check(self.record, self.size, self.hasher, self.expected)


def copy(source_fd: int, record: dict, write: Callable[[bytes], object]) -> int:
    """Feed the decompressed core to ``write`` in chunks; returns its size, raises CoreError on a mismatch.

    The last chunk is held back until the whole core is checked, so a caller that stops on
    CoreError never has the complete (wrong) bytes; decompression stops one chunk past the size the record
    claims (a record from another fleet node may claim 4 KiB of a 1 GiB bomb).
    """
    import zstandard

    hasher, expected = _hasher(record)
    claimed = (record.get("core") or {}).get("size")
    if type(claimed) is not int or claimed < 0:
        raise CoreError(f"the record of crash {record.get('id')} states no size of its core ({str(claimed)[:40]!r})")
    size = 0
    pending = b""
    try:
        with open(source_fd, "rb", closefd=False) as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            while True:
                chunk = reader.read(CHUNK)
                if not chunk:
                    break
                if pending:
                    write(pending)
                hasher.update(chunk)
                size += len(chunk)
                if size > claimed:  # a bomb (or another core) behind a record that claims less: stop here
                    raise CoreError(f"the core of crash {record.get('id')} is larger than the {claimed} bytes its "
                                    "record claims; stopped there")
                pending = chunk
    except zstandard.ZstdError as exc:
        raise CoreError(f"the core of crash {record.get('id')} is corrupt: {exc}") from None
    _check(record, size, hasher, expected)
    if pending:
        write(pending)
    return size


def to_fd(source_fd: int, record: dict, out_fd: int) -> int:
    return copy(source_fd, record, lambda data: write_all(out_fd, data))
