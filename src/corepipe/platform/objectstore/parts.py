"""Uploading one file in numbered parts with bounded memory and concurrency, resuming what was done.

Shared by the vendor adapters: a single reader goes through the file in order, skipping the parts
already uploaded before a restart, and at most ``concurrency`` parts are in memory or on the wire at
once. Each finished part is reported to ``done`` so the caller can persist it before counting on it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Optional, Protocol

from corepipe.platform.objectstore.base import DestinationError

MIB = 1 << 20
#: Bytes of parts in flight at most; the shipper's peak memory is this plus the interpreter and SDK.
IN_FLIGHT = 64 * MIB
#: Seconds between writes of the parts done (each an fsync'd file: once per part cost a quarter of the rate).
SAVE_EVERY = 1.0


def plan(size: int, max_parts: int, part_size: int = 8 * MIB, concurrency: int = 4) -> tuple:
    """(part size, concurrency) for ``size`` bytes: parts grow past ``max_parts``, concurrency shrinks so
    that parts in flight stay within IN_FLIGHT (one part at a time for the very largest files)."""
    while (size + part_size - 1) // part_size > max_parts:
        part_size *= 2
    return part_size, max(1, min(concurrency, IN_FLIGHT // part_size))


def file_digests(fd: int, size: int, part_size: int, new: Callable[[], object]) -> list:
    """``new()`` hashers (hashlib-like) of ``fd``'s first ``size`` bytes, one per part of ``part_size``."""
    found = []
    for offset in range(0, size, part_size):
        hasher = new()
        end = min(offset + part_size, size)
        while offset < end:
            data = os.pread(fd, min(MIB, end - offset), offset)
            if not data:
                raise DestinationError(f"the file shrank while it was read (at byte {offset})")
            hasher.update(data)  # type: ignore[attr-defined]
            offset += len(data)
        found.append(hasher)
    return found


def throttled(save: Callable[[dict], None], seconds: float = SAVE_EVERY) -> Callable[[dict], None]:
    """``save`` at most once per ``seconds``; a part done but not yet saved is only sent again after a restart."""
    last = [0.0]

    def maybe(progress: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= seconds:
            last[0] = now
            save(progress)
    return maybe


class Bandwidth:
    """Caps the average upload rate at ``rate`` bytes per second (0: no cap), shared by all threads."""

    def __init__(self, rate: int):
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0
        self.lock = threading.Lock()

    def take(self, count: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.sent += count
            due = self.start + self.sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class Check(Protocol):
    """Sees a file's bytes in order as they are read for upload (unpack.StreamCheck: the record's digest)."""

    def update(self, data: bytes) -> None: ...

    def verify(self) -> None:
        """Raise if the bytes seen are not what they should be."""


def upload(fd: int, size: int, part_size: int, concurrency: int, finished: dict,
           send: Callable[[int, bytes], object], done: Callable[[int, object], None],
           bandwidth: Optional[Bandwidth] = None, check: Optional[Check] = None) -> None:
    """Send every part of ``fd`` not in ``finished`` (part numbers) through ``send(number, data)``,
    calling ``done(number, token)`` with what ``send`` returned as each completes. ``check`` sees every
    part in order, those uploaded before a restart too (read again, not sent); it is verified before this
    returns, so the caller commits only bytes that passed it."""
    lock = threading.Lock()

    def one(number: int, data: bytes) -> None:
        if bandwidth is not None:
            bandwidth.take(len(data))
        token = send(number, data)
        with lock:
            done(number, token)

    pending: set = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="corepipe-part") as pool:
        offset, number = 0, 1
        while offset < size:
            if number not in finished or check is not None:
                data = os.pread(fd, min(part_size, size - offset), offset)
                if len(data) != min(part_size, size - offset):
                    raise DestinationError(f"the file shrank while it was uploaded (at byte {offset + len(data)})")
                if check is not None:
                    check.update(data)
            if number not in finished:
                while len(pending) >= concurrency:
                    complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in complete:
                        future.result()
                pending.add(pool.submit(one, number, data))
                del data
            offset += part_size
            number += 1
        for future in wait(pending).done:
            future.result()
    if check is not None:
        check.verify()


def upload_recorded(fd: int, size: int, part_size: int, concurrency: int, finished: dict,
                    send: Callable[[int, bytes], object], progress: dict, field: str, save: Callable[[dict], None],
                    bandwidth: Optional[Bandwidth] = None, check: Optional[Check] = None) -> None:
    """``upload`` keeping each finished part's token in ``progress[field]`` (``save``d at most every SAVE_EVERY
    seconds, and once at the end), so that a restart resumes from the parts the store already has."""
    save_part = throttled(save)

    def done(number: int, token: object) -> None:
        progress[field][str(number)] = token
        save_part(progress)

    upload(fd, size, part_size, concurrency, finished, send, done, bandwidth, check)
    save(progress)
