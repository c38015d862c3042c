"""A fleet's crashes in an object store: the object layout, the record summary kept as object metadata,
and the remote catalog that ``list/info/extract/debug --remote`` read.

Layout (README, "Shipping (fleets)")::

    <prefix>/<node>/host/<crash>/core.zst (or core.partial.zst), record.json
    <prefix>/<node>/<runtime>/<container>/<crash>/core.zst (or core.partial.zst), record.json
    <prefix>/.build-id/<xx>/<rest>-<sha256 prefix>     saved binaries, shared by every node

``record.json`` is uploaded last, after everything it refers to is verified: a crash whose record
object exists is complete. Its metadata holds a summary of the record, so a listing needs no download;
the core's metadata holds the record's digest of it (``digest``: ``<algorithm>:<hex>``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from corepipe.domain import batch, binaries, catalog
from corepipe.domain import record as records
from corepipe.platform import digest
from corepipe.platform.fs import write_all
from corepipe.platform.objectstore import Destination, DestinationError
from corepipe.platform.store import BUILD_ID, RECORD, core_file, crash_id

NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SUMMARY = "summary"
DIGEST = "digest"
_SUMMARY_LIMIT = 1500  # S3 allows 2 KiB of user metadata in all
_MAX_RECORD = 64 << 20
#: The summary's ``batch`` (``list --remote --job/--task`` read it): keep these names, an index may rely on them.
BATCH_FIELDS = ("pool", "job", "task", "node", "confirmed", "source")


def _join(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def crash_key(prefix: str, node: str, relative: tuple, name: str) -> str:
    """The key of ``name`` (core.zst, record.json) of the crash at ``relative`` (store path components)."""
    return _join(prefix, node, *relative, name)


def binary_key(prefix: str, stored: tuple) -> str:
    return _join(prefix, BUILD_ID, *stored)


def digest_text(core: dict) -> Optional[str]:
    """The record's digest of its core as the core object's ``digest`` metadata; None if it states none."""
    stated = digest.stated(core)
    return f"{stated[0]}:{stated[1]}" if stated else None


def summary(rec: dict, node: str) -> str:
    """The record's listing fields, as compact base64 JSON that fits in object metadata."""
    container = rec.get("container") or {}
    task = batch.of_record(rec)
    core = rec.get("core") or {}
    limit = 200
    while True:
        def cut(value: object, limit: int = limit) -> object:
            return value[:limit] if isinstance(value, str) else value
        fields = {
            "id": rec.get("id"), "node": node, "time": rec.get("time"), "timestamp": rec.get("timestamp"),
            "received": rec.get("received"),
            "status": rec.get("status"), "pid": rec.get("pid"), "comm": cut(rec.get("comm")),
            "exe": cut(rec.get("exe")), "hostname": cut(rec.get("hostname")), "signal": rec.get("signal"),
            "container": {k: cut(container.get(k)) for k in ("runtime", "id", "name", "image", "pod_name",
                                                               "pod_namespace")},
            "batch": {k: cut(task.get(k)) for k in BATCH_FIELDS} if task else None,
            "core": {k: core.get(k) for k in ("stored", "file", "size", "compressed_size", "truncated", "complete",
                                              "digest", "sha256")},
        }
        text = base64.b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode()
        if len(text) <= _SUMMARY_LIMIT or limit < 10:
            return text
        limit //= 2


def parse_summary(text: str) -> Optional[dict]:
    try:
        value = json.loads(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("id"), str) else None


class RemoteCatalog:
    """The crashes a destination holds, read like the local catalog: (path, record) pairs, where path is
    the crash's URL (``az://container/prefix/node/host/<crash>``)."""

    def __init__(self, destination: Destination):
        self.destination = destination
        self.prefix = destination.location.prefix

    def _path(self, key: str) -> str:
        return f"{self.destination.location.scheme}://{self.destination.location.bucket}/{key.rsplit('/', 1)[0]}"

    def _key(self, path: str, name: str) -> str:
        return path.split("://", 1)[1].split("/", 1)[1] + "/" + name

    def items(self, node: Optional[str] = None) -> list:
        """(path, summary record) of every complete crash (one with a record object), oldest first."""
        base = _join(self.prefix, node or "") + "/"
        objects = [o for o in self.destination.list(base if base != "/" else "")
                   if o.key.endswith("/" + RECORD) and self._crash_name(o.key)]
        missing = [o for o in objects if SUMMARY not in o.metadata]
        if missing:  # S3 listings carry no metadata: one HEAD each, a few at a time
            with ThreadPoolExecutor(max_workers=8) as pool:
                for obj, info in zip(missing, pool.map(lambda o: self.destination.head(o.key), missing)):
                    obj.metadata = info.metadata if info else {}
        found = []
        for obj in objects:
            rec = parse_summary(obj.metadata.get(SUMMARY, ""))
            crash = self._crash_name(obj.key)
            if rec is not None and crash is not None and rec.get("id") == crash:
                found.append((self._path(obj.key), rec))
        return sorted(found, key=catalog.sort_key)

    def _crash_name(self, key: str) -> Optional[str]:
        """The crash id in the directory part of ``key``; None if it is not a crash directory."""
        parts = key.split("/")
        return crash_id(parts[-2]) if len(parts) >= 2 else None

    def record(self, path: str) -> dict:
        """The full record, downloaded."""
        chunks: list = []
        size = self.destination.get(self._key(path, RECORD), chunks.append)
        if size > _MAX_RECORD:
            raise DestinationError(f"{path}/{RECORD} is {size} bytes, too large for a record")
        try:
            rec = records.load(b"".join(chunks))
        except ValueError as exc:
            raise DestinationError(f"{path}/{RECORD} is corrupt: {exc}") from None
        crash = self._crash_name(self._key(path, RECORD))
        if crash is None or rec.get("id") != crash:
            raise DestinationError(f"{path}/{RECORD} has id {str(rec.get('id'))[:20]!r}, not the directory's")
        return rec

    def fetch_core(self, path: str, rec: dict, crash_dir: str) -> None:
        """Download the core the record names into ``crash_dir`` (a new 0600 file); ``unpack`` then checks it
        against the record's digest."""
        name = core_file(rec)
        if name is None:
            raise DestinationError(f"the record of {path} names no core file")
        _download(self.destination, self._key(path, name), os.path.join(crash_dir, name))

    def fetch_binaries(self, rec: dict, store_dir: str) -> list:
        """Download the binaries the record saved into ``store_dir/.build-id``; returns warnings for those
        that are missing or do not match their recorded sha256 (those are not kept)."""
        warnings = []
        for entry in (rec.get("binaries") or {}).get("files") or []:
            stored = binaries.stored_name(entry) if entry.get("stored") else None
            if stored is None:
                continue
            directory = os.path.join(store_dir, BUILD_ID, stored[0])
            os.makedirs(directory, mode=0o700, exist_ok=True)
            target = os.path.join(directory, stored[1])
            digest = hashlib.sha256()
            try:
                _download(self.destination, binary_key(self.prefix, stored), target, digest.update)
            except DestinationError as exc:
                warnings.append(f"saved copy of {entry.get('path')} not fetched: {exc}")
                continue
            if digest.hexdigest() != entry.get("sha256"):
                os.unlink(target)
                warnings.append(f"saved copy of {entry.get('path')} does not match its sha256; not used")
        return warnings


def _download(destination: Destination, key: str, target: str, also: Optional[Callable] = None) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        def write(chunk: bytes) -> None:
            if also is not None:
                also(chunk)
            write_all(fd, chunk)
        destination.get(key, write)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
