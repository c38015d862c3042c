"""Decompress a stored core, checking it against the size and digest in its record (digest.py).

Used by ``extract``, ``debug`` and the collection-time backtrace. A core that does not
decompress, or whose bytes differ from what was recorded, raises CoreError: the check is
the whole point of keeping the hash, so a mismatch is never passed off as a good core.
"""

from __future__ import annotations

import os
from typing import Callable

from corepipe.platform import digest
from corepipe.platform.fs import write_all
from corepipe.platform.store import core_file

CHUNK = 1 << 20


class CoreError(Exception):
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


def copy(source_fd: int, record: dict, write: Callable[[bytes], object]) -> int:
    """Feed the decompressed core to ``write`` in chunks; returns its size, raises CoreError on a mismatch.

    The last chunk is held back until the whole core is checked, so a caller that stops on
    CoreError never has the complete (wrong) bytes.
    """
    import zstandard

    core = record.get("core") or {}
    stated = digest.stated(core)
    if stated is None:
        raise CoreError(f"the record of crash {record.get('id')} states no digest of its core, so it cannot be checked")
    algorithm, expected = stated
    try:
        hasher = digest.new(algorithm)
    except KeyError:
        raise CoreError(f"the core of crash {record.get('id')} has a {algorithm!r} digest, which this corepipe "
                        f"cannot check; use a newer corepipe") from None
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
                pending = chunk
    except zstandard.ZstdError as exc:
        raise CoreError(f"the core of crash {record.get('id')} is corrupt: {exc}") from None
    if size != core.get("size") or hasher.hexdigest() != expected:
        raise CoreError(f"the core of crash {record.get('id')} does not match its record: "
                        f"{size} bytes, {algorithm} {hasher.hexdigest()[:16]}..., expected {core.get('size')} bytes, "
                        f"{algorithm} {expected[:16]}...")
    if pending:
        write(pending)
    return size


def to_fd(source_fd: int, record: dict, out_fd: int) -> int:
    return copy(source_fd, record, lambda data: write_all(out_fd, data))
