"""A fleet's crashes in an object store: the object layout, the index writer, ``reindex``, and the remote catalog
that ``list/info/extract/debug --remote`` read.

Layout (docs/shipping.md)::

    <prefix>/<node>/host/<crash>/core.zst (or core.partial.zst), record.json
    <prefix>/<node>/<runtime>/<container>/<crash>/core.zst (or core.partial.zst), record.json
    <prefix>/.build-id/<xx>/<rest>-<sha256 prefix>     saved binaries, shared by every node
    <prefix>/_index/v1/dt=<day>/node=<node>/<time>-<random>.ndjson.gz   the index (fleet_index)

``record.json`` is uploaded last, after everything it refers to is verified: a crash whose record
object exists is complete. The core's metadata holds the record's digest of it (``digest``:
``<algorithm>:<hex>``). Readers go through
the index: one listing and one GET per index object not read before, never one request per crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from corepipe.domain import binaries, fleet_index, fleet_sql
from corepipe.domain import record as records
from corepipe.platform import fs
from corepipe.platform.objectstore import Destination, DestinationError
from corepipe.platform.store import BUILD_ID, RECORD, core_file, crash_id

NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DIGEST = "digest"
MANIFEST = "manifest.json"
#: An index object of one node and day is far smaller; a bigger one is refused unread.
MAX_INDEX_OBJECT = 256 << 20
MAX_INDEX_ROWS_BYTES = 2 << 30


def _join(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def crash_key(prefix: str, node: str, relative: tuple, name: str) -> str:
    """The key of ``name`` (core.zst, record.json) of the crash at ``relative`` (store path components)."""
    return _join(prefix, node, *relative, name)


def binary_key(prefix: str, stored: tuple) -> str:
    return _join(prefix, BUILD_ID, *stored)


def write_rows(destination: Destination, node: str, rows: list) -> list:
    """Put ``rows`` as new index objects in ``node``'s partitions (one per dump day); returns their keys."""
    by_day: dict = {}
    for value in rows:
        by_day.setdefault(fleet_index.day(value), []).append(value)
    keys = []
    for day, day_rows in sorted(by_day.items()):
        key = fleet_index.object_key(destination.location.prefix, node, day, time.time())
        destination.put_small(key, fleet_index.encode(day_rows), {"rows": str(len(day_rows))})
        keys.append(key)
    return keys


def reindex(remote: RemoteCatalog) -> dict:
    """Index the crashes of a prefix that the index does not name yet (shipped by an older corepipe): one listing,
    one GET per such record. Returns node -> number of crashes indexed."""
    destination, warn = remote.destination, remote.warn
    prefix = destination.location.prefix
    known = set(fleet_sql.query(remote.table(), "SELECT node, id FROM crashes")[1])
    listed = {o.key: o.size for o in destination.list(_join(prefix, "") + "/" if prefix else "")}
    found: dict = {}
    for key, size in listed.items():
        parts = key[len(prefix) + 1 if prefix else 0:].split("/")
        # A node's name starts with a letter or digit: .build-id and _index are not nodes.
        if len(parts) < 3 or parts[-1] != RECORD or not NODE.fullmatch(parts[0]) or crash_id(parts[-2]) is None:
            continue
        node, relative = parts[0], tuple(parts[1:-1])
        if (node, crash_id(parts[-2])) in known:
            continue
        if size > fleet_index.MAX_RECORD:
            warn(f"{key}: {size} bytes, too large for a record; not indexed")
            continue
        chunks: list = []
        try:
            get_bounded(destination, {"key": key, "size": size}, chunks.append)
            rec = records.load(b"".join(chunks))
            problem = records.wrong_type(rec)
            if problem:
                raise ValueError(problem)
        except (DestinationError, ValueError) as exc:
            warn(f"{key}: {exc}; not indexed")
            continue
        if rec.get("id") != crash_id(parts[-2]):
            warn(f"{key}: its id {str(rec.get('id'))[:20]!r} is not its directory's; not indexed")
            continue
        directory = key.rsplit("/", 1)[0] + "/"
        objects = {k: v for k, v in listed.items() if k.startswith(directory) and "/" not in k[len(directory):]}
        for entry in (rec.get("binaries") or {}).get("files") or []:
            stored = binaries.stored_name(entry) if entry.get("stored") else None
            if stored is not None and binary_key(prefix, stored) in listed:
                objects[binary_key(prefix, stored)] = listed[binary_key(prefix, stored)]
        found.setdefault(node, []).append(fleet_index.row(rec, node, prefix, relative, objects))
    for node, rows in found.items():
        write_rows(destination, node, rows)
    return {node: len(rows) for node, rows in found.items()}


class IndexCache:
    """The index objects of one destination already read, as checked rows on local disk: under
    ``$XDG_CACHE_HOME/corepipe/index/<hash of the URL>/`` (``~/.cache`` by default), one NDJSON file per
    object and a manifest. Safe to delete: the next command reads the index again."""

    def __init__(self, destination: Destination, warn: Callable[[str], None]):
        self.destination = destination
        self.prefix = destination.location.prefix
        self.warn = warn
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        name = hashlib.sha256(destination.location.url.encode()).hexdigest()[:24]
        self.directory = os.path.join(base, "corepipe", "index", name)
        #: The index objects the last sync listed but could not read whole (their rows are not in the cache).
        self.unread: list = []

    def _manifest(self) -> dict:
        try:
            with open(os.path.join(self.directory, MANIFEST), "rb") as f:
                value = json.loads(f.read(64 << 20))
        except (OSError, ValueError):
            return {}
        objects = value.get("objects") if isinstance(value, dict) else None
        return objects if isinstance(objects, dict) and value.get("url") == self.destination.location.url else {}

    def sync(self, again: bool = False) -> dict:
        """Read the index objects not seen yet (one listing, then one GET per new object; ``again``: and those
        that could not be read whole before, which are otherwise cached without rows, warned about once); forget
        the ones gone from the bucket. Returns key -> cached file of every object."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        manifest = self._manifest()
        current: dict = {}
        new = []
        self.unread = []
        for obj in self.destination.list(fleet_index.root(self.prefix)):
            where = fleet_index.partition(self.prefix, obj.key)
            if where is None:
                self.warn(f"{obj.key[:200]}: not an index object this corepipe reads; skipped")
                self.unread.append(obj.key)
                continue
            seen = manifest.get(obj.key)
            if isinstance(seen, dict) and seen.get("etag") == obj.etag and seen.get("size") == obj.size and \
                    not (again and seen.get("unread")) and \
                    os.path.exists(os.path.join(self.directory, str(seen.get("file")))):
                current[obj.key] = seen
                if seen.get("unread"):
                    self.unread.append(obj.key)
                continue
            if obj.size > MAX_INDEX_OBJECT:
                self.warn(f"{obj.key}: {obj.size} bytes, more than an index object may be ({MAX_INDEX_OBJECT}); "
                          "skipped")
                self.unread.append(obj.key)
                continue
            new.append((obj, where[1]))
        with ThreadPoolExecutor(max_workers=8) as pool:  # a cold cache: requests at once, rows checked as read
            for (obj, _node), (name, whole) in zip(new, pool.map(
                    lambda item: self._read(item[0].key, item[0].size, item[1]), new)):
                current[obj.key] = {"etag": obj.etag, "size": obj.size, "file": name}
                if not whole:
                    current[obj.key]["unread"] = True
                    self.unread.append(obj.key)
        for key, seen in manifest.items():
            if key not in current and isinstance(seen, dict) and re.fullmatch(r"[0-9a-f]{32}\.ndjson",
                                                                              str(seen.get("file"))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, seen["file"]))
        data = json.dumps({"url": self.destination.location.url, "objects": current}).encode()
        fs.replace(os.path.join(self.directory, MANIFEST), lambda fd: fs.write_all(fd, data))
        return current

    def _read(self, key: str, size: int, node: str) -> tuple:
        """Download one index object, keep its good rows (none when it cannot be read whole); (the cache file's
        name, whether it was read whole)."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".ndjson"
        good = read_object(self.destination, key, size, node, self.warn)
        data = b"".join(json.dumps(checked, separators=(",", ":")).encode() + b"\n" for checked in good or [])
        fs.replace(os.path.join(self.directory, name), lambda fd: fs.write_all(fd, data))
        return name, good is not None


def read_object(destination: Destination, key: str, size: int, node: str,
                warn: Callable[[str], None]) -> Optional[list]:
    """The rows of one index object of ``node``'s partition that pass ``fleet_index.check`` (one warning for each
    other), reading at most the ``size`` its listing gave; None, with a warning, when it cannot be read whole (so
    a cut-short object's ``replaces`` row is never honoured)."""
    reader = _Rows(key, size, warn)
    try:
        destination.get(key, reader.feed)
        reader.finish()
    except DestinationError as exc:
        warn(f"{key}: {exc}; skipped")
        return None
    good = []
    for number, value in reader.rows:
        try:
            good.append(fleet_index.check(value, destination.location.prefix, node))
        except fleet_index.BadRow as exc:
            warn(f"{key} row {number}: {exc}; skipped")
    return good


class _Rows:
    """NDJSON rows from a gzip stream fed in chunks: bounded by the object's listed size, its uncompressed size
    and the length of one line."""

    def __init__(self, key: str, size: int, warn: Callable[[str], None]):
        self.key = key
        self.size = size
        self.warn = warn
        self.received = 0
        self.inflated = 0
        self.unzip = zlib.decompressobj(wbits=31)
        self.pending = b""
        self.number = 0
        self.rows: list = []

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.size:
            raise DestinationError(f"more bytes than the listing said ({self.size})")
        try:
            data = self.unzip.decompress(chunk)
        except zlib.error as exc:
            raise DestinationError(f"not gzip data ({exc})") from None
        self.inflated += len(data)
        if self.inflated > MAX_INDEX_ROWS_BYTES:
            raise DestinationError(f"more than {MAX_INDEX_ROWS_BYTES} bytes of rows")
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self.pending) > fleet_index.MAX_LINE:
            raise DestinationError(f"a line longer than {fleet_index.MAX_LINE} bytes")

    def _line(self, line: bytes) -> None:
        self.number += 1
        if not line.strip():
            return
        try:
            self.rows.append((self.number, json.loads(line)))
        except ValueError:
            self.warn(f"{self.key} row {self.number}: not JSON; skipped")

    def finish(self) -> None:
        if not self.unzip.eof:
            raise DestinationError("the gzip stream is cut short")
        if self.pending:
            self._line(self.pending)


class RemoteCatalog:
    """The crashes a destination holds, read from its index like the local catalog: (path, row) pairs, where path
    is the crash's URL (``az://container/prefix/node/host/<crash>``) and the row has the listing's fields."""

    def __init__(self, destination: Destination, warn: Callable[[str], None]):
        self.destination = destination
        self.prefix = destination.location.prefix
        self.warn = warn
        self.index = IndexCache(destination, warn)
        self.rows: dict = {}
        self._table = None

    def table(self):  # -> a DuckDB connection; fleet_sql imports DuckDB only when it is used
        """The index, brought up to date, as fleet_sql's table ``crashes``."""
        if self._table is None:
            self._table = fleet_sql.connect(self.index.directory, self.index.sync(), self.warn)
        return self._table

    def path(self, value: dict) -> str:
        """The URL of the crash directory of an index row."""
        where = self.destination.location
        return f"{where.scheme}://{where.bucket}/{value['keys']['record']['key'].rsplit('/', 1)[0]}"

    def items(self, node: Optional[str], prefix: Optional[str]) -> list:
        """(path, row) of the crashes whose id starts with ``prefix`` (of ``node`` only, if given), oldest first;
        only the latest when ``prefix`` is None."""
        found = []
        for value in fleet_sql.find(self.table(), node, prefix):
            path = self.path(value)
            self.rows[path] = value
            found.append((path, value))
        return found

    def record(self, path: str) -> dict:
        """The full record, downloaded from the key the index names, at most the size it claims."""
        value = self.rows[path]
        chunks: list = []
        get_bounded(self.destination, value["keys"]["record"], chunks.append)
        key = value["keys"]["record"]["key"]
        try:
            rec = records.load(b"".join(chunks))
        except ValueError as exc:
            raise DestinationError(f"{key} is corrupt: {exc}") from None
        problem = records.wrong_type(rec)
        if problem:  # any node wrote it: a field of the wrong type is one line here, never a traceback later
            raise DestinationError(f"{key} is not a record this corepipe reads: {problem}")
        if rec.get("id") != value["id"]:
            raise DestinationError(f"{key} has id {str(rec.get('id'))[:20]!r}, not {value['id']}")
        return rec

    def fetch_core(self, path: str, rec: dict, crash_dir: str) -> None:
        """Download the core the index names into ``crash_dir`` (a new 0600 file, named as the record names it);
        ``unpack`` then checks it against the record's digest."""
        where = self.rows[path]["keys"]["core"]
        name = core_file(rec)
        if where is None or name is None or not where["key"].endswith("/" + name):
            raise DestinationError(f"the index names no core object for {path}")
        _download(self.destination, where, os.path.join(crash_dir, name))

    def fetch_binaries(self, rec: dict, store_dir: str) -> list:
        """Download the binaries the record saved into ``store_dir/.build-id``; returns warnings for those
        that are missing or do not match their recorded sha256 (those are not kept)."""
        warnings = []
        for entry in (rec.get("binaries") or {}).get("files") or []:
            stored = binaries.stored_name(entry) if entry.get("stored") else None
            size = entry.get("size")
            if stored is None or not isinstance(size, int) or not 0 <= size <= fleet_index.MAX_CORE:
                continue
            directory = os.path.join(store_dir, BUILD_ID, stored[0])
            os.makedirs(directory, mode=0o700, exist_ok=True)
            target = os.path.join(directory, stored[1])
            digest = hashlib.sha256()
            try:
                _download(self.destination, {"key": binary_key(self.prefix, stored), "size": size}, target,
                          digest.update)
            except DestinationError as exc:
                warnings.append(f"saved copy of {entry.get('path')} not fetched: {exc}")
                continue
            if digest.hexdigest() != entry.get("sha256"):
                os.unlink(target)
                warnings.append(f"saved copy of {entry.get('path')} does not match its sha256; not used")
        return warnings


def get_bounded(destination: Destination, where: dict, write: Callable[[bytes], object]) -> None:
    """Stream ``where["key"]`` to ``write``, stopping at more bytes than ``where["size"]`` claims."""
    received = [0]

    def bounded(chunk: bytes) -> None:
        received[0] += len(chunk)
        if received[0] > where["size"]:
            raise DestinationError(f"{where['key']} is larger than the {where['size']} bytes the index claims")
        write(chunk)
    destination.get(where["key"], bounded)
    if received[0] != where["size"]:
        raise DestinationError(f"{where['key']} is {received[0]} bytes, the index claims {where['size']}")


def _download(destination: Destination, where: dict, target: str, also: Optional[Callable] = None) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        def write(chunk: bytes) -> None:
            if also is not None:
                also(chunk)
            fs.write_all(fd, chunk)
        get_bounded(destination, where, write)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
