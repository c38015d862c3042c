"""``corepipe ship``: every finished crash of this node to one object store, verified, exactly once.

Per crash, in this order: the saved binaries it references (content-addressed, so each is uploaded
once per fleet: an existing object of the right size and sha256 is not sent again), the core (in
parts, resumable from ``ship-progress.json``), and the record last.
The core's bytes are checked against the record's digest (core.digest, or sha256 in old records) as
they are read for the upload, before the object is committed, and the digest goes on as metadata.
Each upload is read back (size, the store's checksum, the digest metadata) before the next step; then
``shipped.json`` is written, and only then, if configured, the local crash is deleted (through books.Books,
under the store lock, so the ledger is right at once). A crash still
being collected is never touched. Shipping runs in its own process, never in the kernel's handler.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from corepipe.domain import binaries, catalog, core_budget, fleet, fleet_compact, fleet_index
from corepipe.domain.books import Books
from corepipe.platform import log, unpack
from corepipe.platform.config import Config
from corepipe.platform.errors import UsageError
from corepipe.platform.objectstore import Destination, DestinationError, ObjectInfo, open_destination, parts
from corepipe.platform.store import (
    BUILD_ID,
    FILE_MODE,
    RECORD,
    SHIP_INDEX,
    SHIP_LOCK,
    SHIP_PROGRESS,
    SHIP_STATUS,
    SHIPPED,
    CrashDir,
    Store,
    StoreDir,
    core_file,
    open_dir,
)

#: Files up to this size go in one request; larger ones in parts.
SINGLE_SHOT = 8 * parts.MIB
#: Seconds between sweeps when nothing wakes the shipper (inotify missing, or a missed event).
POLL = 60


@dataclass
class Sweep:
    shipped: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    pending: int = 0


def node_name(cfg: Config) -> str:
    name = cfg.ship_node or socket.gethostname().split(".")[0]
    if not fleet.NODE.fullmatch(name):
        raise UsageError(f"node name {name[:70]!r} cannot be part of an object key; set ship_node in the config")
    return name


def connect(url: str, cfg: Config) -> Destination:
    return open_destination(url, concurrency=cfg.ship_concurrency, bandwidth=cfg.ship_bandwidth)


def _open_crash(store_fd: int, relative: tuple) -> int:
    fd = store_fd
    opened = []
    try:
        for name in relative:
            fd = open_dir(fd, name, create=False)
            opened.append(fd)
        return os.dup(fd)
    finally:
        for f in opened:
            os.close(f)


def _read_file(dir_fd: int, name: str) -> tuple:
    """(fd, size) of a regular file in ``dir_fd``, never through a link."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not (st.st_mode & 0o170000 == 0o100000):
        os.close(fd)
        raise OSError(f"{name} is not a regular file")
    return fd, st.st_size


def _load_json(dir_fd: int, name: str) -> dict:
    try:
        fd, _size = _read_file(dir_fd, name)
    except FileNotFoundError:
        return {}
    with open(fd, "rb") as f:
        try:
            value = json.loads(f.read(1 << 20))
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


class Shipper:
    def __init__(self, cfg: Config, destination: Destination, node: str):
        self.cfg = cfg
        self.destination = destination
        self.node = node
        self.prefix = destination.location.prefix

    def pending(self) -> list:
        """(path, record) of the finished crashes not yet shipped to this destination (or shipped, not yet in the
        index or not yet deleted), oldest first."""
        items = []
        for path, rec in sorted(catalog.iter_records(self.cfg.store), key=catalog.sort_key):
            if rec.get("status") == "collecting":
                continue
            marker = self._marker(path)  # shipped elsewhere (ship_to changed): shipped here too
            if marker.get("destination") != self.destination.location.url or not marker.get("indexed") or \
                    (self.cfg.delete_after_ship and not marker.get("withheld")):
                items.append((path, rec))
        return items

    def _marker(self, path: str) -> dict:
        """The crash's shipped.json ({} if it has none or it is unreadable)."""
        try:
            crash_fd = open_dir(None, path, create=False)
        except OSError:
            return {}
        try:
            return _load_json(crash_fd, SHIPPED)
        finally:
            os.close(crash_fd)

    def sweep(self) -> Sweep:
        """Ship everything pending; an access-denied error stops the sweep (every crash would fail alike).
        One shipper at a time per store (cron and a resident one must not upload the same crash at once)."""
        try:
            store_fd = open_dir(None, self.cfg.store, create=False)
        except FileNotFoundError:
            return Sweep()  # nothing collected yet
        try:
            lock = os.open(SHIP_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=store_fd)
        finally:
            os.close(store_fd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return Sweep(errors=[f"another 'corepipe ship' is sweeping {self.cfg.store}; nothing done"])
        try:
            return self._sweep()
        finally:
            os.close(lock)

    def _sweep(self) -> Sweep:
        result = Sweep()
        items = self.pending()
        result.pending = len(items)
        done = []
        for path, rec in items:
            try:
                self.ship(path, rec)
                result.shipped.append(rec["id"])
                done.append((path, rec))
            except DestinationError as exc:
                result.errors.append(f"crash {rec.get('id')}: cannot ship to {self.destination.location.url}: {exc}")
                if exc.auth:
                    break
            except unpack.CoreError as exc:
                result.errors.append(f"crash {rec.get('id')}: not shipped, kept locally: {exc}")
            except OSError as exc:
                result.errors.append(f"crash {rec.get('id')}: cannot ship from {path}: {exc.strerror or exc}")
        written: list = []
        try:
            written = self._index(done)
            if self.cfg.delete_after_ship:
                self._delete(done, result)
        except DestinationError as exc:
            result.errors.append(f"cannot write the index at {self.destination.location.url}: {exc}; crashes kept "
                                 "and indexed on the next sweep")
        except OSError as exc:
            result.errors.append(f"cannot update {self.cfg.store} after indexing: {exc.strerror or exc}")
        try:
            self._compact(written)
        except DestinationError as exc:
            result.errors.append(f"cannot compact the index at {self.destination.location.url}: {exc}; tried again "
                                 "on the next sweep")
        except OSError as exc:
            result.errors.append(f"cannot write {self.cfg.store}/{SHIP_INDEX}: {exc.strerror or exc}")
        try:
            self._write_status(result)
        except OSError as exc:
            result.errors.append(f"cannot write {self.cfg.store}/{SHIP_STATUS}: {exc.strerror or exc}")
        return result

    def ship(self, path: str, rec: dict) -> None:
        relative = tuple(os.path.relpath(path, self.cfg.store).split(os.sep))
        store_fd = open_dir(None, self.cfg.store, create=False)
        try:
            crash_fd = _open_crash(store_fd, relative)
            crash = CrashDir(crash_fd, path, rec["id"])
            try:
                if self._marker(path).get("destination") != self.destination.location.url:
                    self._upload(store_fd, crash, relative, rec)
            finally:
                crash.close()
        finally:
            os.close(store_fd)

    def _upload(self, store_fd: int, crash: CrashDir, relative: tuple, rec: dict) -> None:
        progress = _load_json(crash.fd, SHIP_PROGRESS)
        if progress.get("destination") != self.destination.location.url:
            progress = {"destination": self.destination.location.url}

        def save(_part: dict) -> None:
            crash.write(SHIP_PROGRESS, json.dumps(progress).encode())

        listed = rec
        name = core_file(rec)
        withheld = False
        if (rec.get("core") or {}).get("stored") and (name is None or not os.path.lexists(os.path.join(crash.path,
                                                                                                       name))):
            # The core is gone and the record kept: ship the record, listed as without core.
            listed = {**rec, "core": {**rec["core"], "stored": False}}
        elif (rec.get("core") or {}).get("stored") and not self._within_budget(rec, progress, save):
            # The fleet has its budget of cores of this signature: the record ships, the core stays here.
            listed, withheld = {**rec, "core": {**rec["core"], "stored": False}}, True
            print(f"corepipe ship: crash {rec['id']}: record only, its core kept on this node: the fleet has "
                  f"{self.cfg.ship_signature_cores} cores of its signature (ship_signature_cores)", file=sys.stderr)
        objects = {}
        for entry in (rec.get("binaries") or {}).get("files") or []:
            stored = binaries.stored_name(entry) if entry.get("stored") and not withheld else None
            if stored is not None:
                key = fleet.binary_key(self.prefix, stored)
                size = self._binary(store_fd, stored, key, entry, progress.setdefault(key, {}), save)
                if size is None:  # removed locally since (rm, prune): the crash ships without it
                    print(f"corepipe ship: warning: crash {rec['id']}: the saved copy of {entry.get('path')} is "
                          "gone; shipped without it", file=sys.stderr)
                else:
                    objects[key] = size
        if (listed.get("core") or {}).get("stored"):
            key = fleet.crash_key(self.prefix, self.node, relative, name)
            wanted = fleet_index.digest_text(rec["core"])
            fd, size = _read_file(crash.fd, name)
            first = [True]

            def save_core(part: dict) -> None:
                if first and (part.get("parts") or part.get("blocks")):
                    print(f"corepipe ship: resuming {key}: {len(part.get('parts') or part.get('blocks'))} parts "
                          "already uploaded", file=sys.stderr)
                first.clear()
                save(part)
            try:
                info = self._put(key, fd, size, progress.setdefault(key, {}), save_core, {fleet.DIGEST: wanted},
                                 unpack.StreamCheck(rec))
            finally:
                os.close(fd)
            if info.metadata.get(fleet.DIGEST) != wanted:
                raise DestinationError(f"{key} read back with digest {info.metadata.get(fleet.DIGEST)!r}, "
                                       f"expected {wanted}")
            objects[key] = info.size
        key = fleet.crash_key(self.prefix, self.node, relative, RECORD)
        fd, size = _read_file(crash.fd, RECORD)
        with open(fd, "rb") as f:
            data = f.read(size)
        info = self.destination.put_small(key, data, {})
        objects[key] = info.size
        crash.write(SHIPPED, json.dumps({"destination": self.destination.location.url, "node": self.node,
                                         "time": time.time(), "objects": objects, "withheld": withheld},
                                        indent=1).encode())
        try:
            os.unlink(SHIP_PROGRESS, dir_fd=crash.fd)
        except FileNotFoundError:
            pass
        where = self.destination.location
        log.log(f"shipped crash {rec['id']} to {where.scheme}://{where.bucket}/{key.rsplit('/', 1)[0]}")

    def _within_budget(self, rec: dict, progress: dict, save) -> bool:
        """Whether the crash's core ships under its signature's fleet-wide budget (ship_signature_cores): it
        holds one of the signature's markers. Decided once; the decision is kept in ship-progress.json."""
        signature = core_budget.signature(rec)
        decided = progress.get(core_budget.PROGRESS)
        if not self.cfg.ship_signature_cores or signature is None:
            return True
        if decided not in (None, core_budget.CLAIMING):
            return decided != core_budget.SPENT
        progress[core_budget.PROGRESS] = core_budget.CLAIMING
        save(progress)
        try:
            held = core_budget.claim(self.destination, signature, self.cfg.ship_signature_cores, self.node,
                                     rec["id"], resumed=decided == core_budget.CLAIMING)
        except DestinationError as exc:
            # A store without conditional writes (501), a role that may not list _budget: the budget saves
            # bandwidth, it must not stop shipping; this core ships.
            print(f"corepipe ship: warning: crash {rec['id']}: core budget not applied ({exc}); its core ships",
                  file=sys.stderr)
            return True
        progress[core_budget.PROGRESS] = held or core_budget.SPENT
        save(progress)
        return held is not None

    def _binary(self, store_fd: int, stored: tuple, key: str, entry: dict, progress: dict, save) -> Optional[int]:
        try:
            area_fd = open_dir(store_fd, BUILD_ID, create=False)
            try:
                sub_fd = open_dir(area_fd, stored[0], create=False)
                try:
                    fd, size = _read_file(sub_fd, stored[1])
                finally:
                    os.close(sub_fd)
            finally:
                os.close(area_fd)
        except FileNotFoundError:
            return None
        try:
            # Another crash (of any node) may have sent it already (content-addressed), or another node planted
            # junk under its name first: judged by the checksum the store computed, never by metadata.
            existing = None if progress else self.destination.same(key, fd, size)
            if existing is not None:
                return existing.size
            return self._put(key, fd, size, progress, save, {"sha256": entry["sha256"]}).size
        finally:
            os.close(fd)

    def _put(self, key: str, fd: int, size: int, progress: dict, save, metadata: dict,
             check: Optional[parts.Check] = None) -> ObjectInfo:
        """One request for a small file, parts for a large one; ``check`` passes before anything is committed."""
        if size > SINGLE_SHOT:
            return self.destination.put_large(key, fd, size, progress, save, metadata, check)
        data = os.pread(fd, size, 0)
        if check is not None:
            check.update(data)
            check.verify()
        return self.destination.put_small(key, data, metadata)

    def _index(self, done: list) -> list:
        """Write the index rows of the crashes shipped to this destination and not yet indexed (one object per
        dump day, in this node's partition), then mark them indexed: a crash is deleted locally only after.
        Returns the keys of the index objects written."""
        rows, marked = [], []
        for path, rec in done:
            marker = self._marker(path)
            if marker.get("destination") != self.destination.location.url or marker.get("indexed"):
                continue
            relative = tuple(os.path.relpath(path, self.cfg.store).split(os.sep))
            objects = marker.get("objects") if isinstance(marker.get("objects"), dict) else {}
            rows.append(fleet_index.row(rec, self.node, self.prefix, relative, objects, bool(marker.get("withheld"))))
            marked.append((path, marker))
        written = fleet.write_rows(self.destination, self.node, rows) if rows else []
        for key in written:
            log.log(f"indexed {len(rows)} crashes in {key}")
        for path, marker in marked:
            crash = StoreDir(open_dir(None, path, create=False), path)
            try:
                crash.write(SHIPPED, json.dumps({**marker, "indexed": True}, indent=1).encode())
            finally:
                crash.close()
        return written

    def _compact(self, written: list) -> None:
        """Compact this node's index partitions that are due (fleet_compact.due), from the count of objects per day
        kept in SHIP_INDEX, which the keys just ``written`` add to."""
        store_fd = open_dir(None, self.cfg.store, create=False)
        area = StoreDir(store_fd, self.cfg.store)
        try:
            url = self.destination.location.url
            days = fleet_compact.count(_load_json(store_fd, SHIP_INDEX), url, written, self.prefix)
            try:
                for day in fleet_compact.due(days, time.time()):
                    key = fleet_compact.compact(self.destination, self.node, day,
                                                lambda text: log.log(f"ship: index: {text}", log.WARNING))
                    if key:
                        log.log(f"compacted {days[day]} index objects of {day} into {key}")
                    days[day] = 1
            finally:
                settled = fleet_compact.settled(days, time.time())
                if written or settled != days:
                    area.write(SHIP_INDEX, json.dumps({"destination": url, "days": settled}).encode())
        finally:
            area.close()

    def _delete(self, done: list, result: Sweep) -> None:
        """Remove the shipped crashes, each only once its shipped.json (written after verification) says it is
        indexed here; under the store's lock, with the ledger and the saved binaries only they used."""
        with Store(self.cfg.store, create=False) as store, Books(store) as books:
            for path, rec in done:
                marker = self._marker(path)
                if marker.get("destination") != self.destination.location.url or not marker.get("indexed") or \
                        marker.get("withheld"):
                    continue  # shipped elsewhere before, not in the index yet, or its core kept here
                try:
                    books.delete_crash(*catalog.group_of(path, self.cfg.store))
                except OSError as exc:
                    result.errors.append(f"crash {rec['id']}: shipped, but cannot delete {path}: "
                                         f"{exc.strerror or exc}")
                    continue
                log.log(f"deleted local crash {rec['id']} after a verified upload")

    def _write_status(self, result: Sweep) -> None:
        store_fd = open_dir(None, self.cfg.store, create=False)
        area = StoreDir(store_fd, self.cfg.store)
        try:
            previous = _load_json(store_fd, SHIP_STATUS)
            now = time.time()
            status = {"destination": self.destination.location.url, "node": self.node, "time": now,
                      "pending": result.pending - len(result.shipped), "shipped": len(result.shipped),
                      "ok": not result.errors, "last_error": previous.get("last_error"),
                      "last_shipped": previous.get("last_shipped")}
            if result.errors:
                status["last_error"] = {"time": now, "message": result.errors[-1]}
            if result.shipped:
                status["last_shipped"] = {"time": now, "id": result.shipped[-1]}
            area.write(SHIP_STATUS, json.dumps(status, indent=1).encode())
        finally:
            area.close()


def report(result: Sweep) -> None:
    """One line per failure, on stderr and in the system log."""
    for message in result.errors:
        print(f"corepipe ship: error: {message}", file=sys.stderr)
        log.log(f"ship: {message}", log.ERR)


def resident(shipper: Shipper, watcher, stop=lambda: False) -> None:
    """Sweep on start, then whenever a crash is filed (or every POLL seconds), retrying failures with
    exponential backoff up to ``ship_retry_max`` seconds."""
    delay = 0.0
    while not stop():
        watcher.watch_tree()
        result = shipper.sweep()
        report(result)
        delay = min(max(1.0, delay * 2), shipper.cfg.ship_retry_max) if result.errors else 0.0
        watcher.wait(delay or POLL)
