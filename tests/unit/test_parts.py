"""parts.upload with unpack.StreamCheck: every byte read for the upload is checked against the record's digest,
parts uploaded before a restart included, and a mismatch raises before the caller could commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard

from corepipe.platform import digest, unpack
from corepipe.platform.objectstore import parts

PART = 64 << 10


def core(tmp_path: Path, damage: bool = False) -> tuple:
    """(fd of a zstd core, its size, the record stating the digest of the undamaged bytes)."""
    data = os.urandom(5 * PART + 123)
    hasher = digest.new()
    hasher.update(data)
    record = {"id": "0123456789ab", "core": {"stored": True, "size": len(data), "digest": digest.as_stated(hasher)}}
    packed = bytearray(zstandard.ZstdCompressor(level=1).compress(data))
    if damage:
        packed[len(packed) // 2] ^= 0xFF
    path = tmp_path / "core.zst"
    path.write_bytes(bytes(packed))
    return os.open(path, os.O_RDONLY), len(packed), record


def upload(fd: int, size: int, record: dict, finished: dict) -> dict:
    sent: dict = {}
    parts.upload(fd, size, PART, 2, finished, lambda n, data: sent.setdefault(n, data), lambda n, token: None,
                 check=unpack.StreamCheck(record))
    return sent


def test_a_good_core_passes_and_parts_done_before_are_read_not_sent(tmp_path: Path) -> None:
    fd, size, record = core(tmp_path)
    sent = upload(fd, size, record, {1: True, 2: True})
    assert sorted(sent) == list(range(3, (size + PART - 1) // PART + 1))
    assert b"".join(sent[n] for n in sorted(sent)) == os.pread(fd, size, 2 * PART)


@pytest.mark.parametrize("finished", [{}, {1: True, 2: True, 3: True, 4: True, 5: True}])
def test_a_core_that_differs_from_its_record_raises_before_the_commit(tmp_path: Path, finished: dict) -> None:
    fd, size, record = core(tmp_path, damage=True)
    with pytest.raises(unpack.CoreError, match="0123456789ab"):
        upload(fd, size, record, finished)


def test_a_record_with_another_digest_raises(tmp_path: Path) -> None:
    fd, size, record = core(tmp_path)
    record["core"]["digest"]["value"] = "0" * 32
    with pytest.raises(unpack.CoreError, match="does not match its record"):
        upload(fd, size, record, {})
