"""Destination URLs, the index row, part planning, the store watcher and the index cache's files."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from corepipe.domain import fleet, fleet_index
from corepipe.platform import config, fs, objectstore
from corepipe.platform.objectstore import parts
from corepipe.platform.store import RECORD, SHIP_PROGRESS, Store
from corepipe.platform.watch import Watcher


def test_destination_urls() -> None:
    assert objectstore.parse("az://crashes/pool-1/x/").url == "az://crashes/pool-1/x"
    assert objectstore.parse("s3://my.bucket").prefix == ""
    for bad in ("gs://b/p", "az://", "s3://B/p", "az://c/a//b", "s3://bkt/../up", "crashes/p"):
        with pytest.raises(ValueError):
            objectstore.parse(bad)


def test_the_index_row_carries_batch() -> None:
    """``list --remote --job/--task`` read the index row's ``batch``; its field names are kept stable."""
    task = {"pool": "pool-1", "job": "nightly-7", "task": "42", "node": "tvm-3", "confirmed": True,
            "source": "docker state"}
    rec = {"id": "0123456789ab", "container": {"runtime": "docker"}, "batch": task}
    assert fleet_index.BATCH == ("pool", "job", "task", "node", "confirmed", "source")
    assert fleet_index.row(rec, "tvm-3", "fleet", ("docker", "abc", "x-0123456789ab"), {})["batch"] == task
    assert fleet_index.row({"id": "0123456789ab"}, "n", "fleet", ("uid", "0", "x-0123456789ab"), {})["batch"] is None


def test_keys_follow_the_store_layout() -> None:
    assert fleet.crash_key("fleet", "n1", ("docker", "abc", "20261202T060000Z-0123456789ab"), RECORD) == \
        "fleet/n1/docker/abc/20261202T060000Z-0123456789ab/record.json"
    assert fleet.binary_key("", ("ab", "cdef-0123")) == ".build-id/ab/cdef-0123"


def test_part_plan_bounds_memory_whatever_the_size() -> None:
    assert parts.plan(1 << 30, 10000) == (8 << 20, 4)
    for size in (1 << 40, 5 << 40):
        part_size, concurrency = parts.plan(size, 10000)
        assert (size + part_size - 1) // part_size <= 10000
        assert part_size * concurrency <= max(parts.IN_FLIGHT, part_size)


def test_watcher_wakes_for_a_filed_record_not_for_the_shippers_own_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store(str(root)) as store:
        crash = store.new_crash(("host",))
    watcher = Watcher(str(root))
    try:
        assert watcher.event_driven
        watcher.watch_tree()
        crash.write(SHIP_PROGRESS, b"{}")
        assert watcher.wait(0.2) is False
        woke = []
        thread = threading.Thread(target=lambda: woke.append(watcher.wait(30)))
        thread.start()
        crash.write(RECORD, b"{}")
        thread.join()
        assert woke == [True]
        os.mkdir(root / "docker")
        assert watcher.wait(5) is True
    finally:
        watcher.close()
        crash.close()


def test_ship_config_is_checked_and_loads_no_sdk() -> None:
    """The handler reads the same config: a ship_to in it must not pull an SDK onto the collect path."""
    code = ("import sys\nfrom corepipe.platform import config\n"
            "cfg = config.parse('ship_to = \"s3://bucket/fleet\"\\nship_bandwidth = 1000\\n')\n"
            "assert cfg.ship_to == 's3://bucket/fleet' and cfg.ship_bandwidth == 1000\n"
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'azure')))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""
    for text, message in (('ship_to = "gs://x/y"', "ship_to:"), ("ship_concurrency = 0", "at least 1"),
                          ("ship_bandwidth = -1", "must not be negative")):
        with pytest.raises(config.ConfigError, match=message):
            config.parse(text)


def test_the_pruners_partition_holds_tombstones_of_any_node_and_nothing_else() -> None:
    """``node=_prune`` is no node's (a node's name starts with a letter or digit): its tombstones name the crash's
    node; a crash row there, or a tombstone naming no node, is refused; a node's partition still refuses another
    node's tombstone."""
    assert fleet_index.partition("f", "f/_index/v1/dt=2026-12-07/node=_prune/20261207T000000.000000Z-ab.ndjson.gz") \
        == ("2026-12-07", "_prune")
    assert fleet_index.partition("f", "f/_index/v1/dt=2026-12-07/node=_x/20261207T000000.000000Z-ab.ndjson.gz") is None
    tomb = fleet_index.tombstone("node-a", "0123456789ab", 1.0, 2.0)
    assert fleet_index.check(tomb, "f", fleet_index.PRUNER)["node"] == "node-a"
    assert fleet_index.check(tomb, "f", "node-a")["node"] == "node-a"
    with pytest.raises(fleet_index.BadRow, match="claims node 'node-a' but is in node=node-b"):
        fleet_index.check(tomb, "f", "node-b")
    with pytest.raises(fleet_index.BadRow, match="names no node"):
        fleet_index.check({**tomb, "node": "../x"}, "f", fleet_index.PRUNER)
    with pytest.raises(fleet_index.BadRow, match="in the pruner's partition"):
        fleet_index.check({**tomb, "kind": "crash"}, "f", fleet_index.PRUNER)


def test_a_compacted_objects_first_row_names_only_objects_of_its_partition() -> None:
    row = fleet_index.replaces(["20261207T000000.000000Z-b.ndjson.gz", "20261207T000000.000000Z-a.ndjson.gz"])
    assert fleet_index.check(row, "f", "node-a")["objects"] == sorted(row["objects"])
    for bad in (["../node=b/20261207T000000.000000Z-a.ndjson.gz"], ["x"], [1], "20261207T000000.000000Z-a.ndjson.gz"):
        with pytest.raises(fleet_index.BadRow, match="index object names of its partition"):
            fleet_index.check({**row, "objects": bad}, "f", "node-a")


def test_compaction_is_due_at_eight_objects_today_or_two_of_a_past_day() -> None:
    from corepipe.domain import fleet_compact

    key = "f/_index/v1/dt={}/node=n/20261207T000000.000000Z-ab.ndjson.gz"
    days = fleet_compact.count({"destination": "s3://b/f", "days": {"2026-12-06": 1, "2026-12-07": 7}}, "s3://b/f",
                               [key.format("2026-12-06"), key.format("2026-12-05")], "f")
    assert days == {"2026-12-05": 1, "2026-12-06": 2, "2026-12-07": 7}
    now = 1796601600.0 + 3600  # 2026-12-07 01:00 UTC
    assert fleet_compact.due(days, now) == ["2026-12-06"]
    assert fleet_compact.due({**days, "2026-12-07": 8}, now) == ["2026-12-06", "2026-12-07"]
    assert fleet_compact.settled({**days, "2026-10-01": 1, "2026-10-02": 2}, now) == {**days, "2026-10-02": 2}
    assert fleet_compact.count({"destination": "s3://b/old", "days": {"2026-12-06": 5}}, "s3://b/f", [], "f") == {}


def test_azure_listing_reads_the_xml_pages_and_decodes_an_encoded_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service sends a name that XML cannot carry URL-encoded (Azurite fails such a listing instead: e2e
    test_objectstore_listing.py cannot check it); a page that is not the service's XML is one line."""
    from corepipe.platform.objectstore import azure

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=http;AccountName=a;AccountKey="
                       "YWJj;BlobEndpoint=http://127.0.0.1:9/a;")
    destination = azure.open(objectstore.parse("az://crashes/p"))
    pages = {"": b"<?xml version='1.0'?><EnumerationResults><Blobs><Blob><Name Encoded='true'>p/ctl%01x%26y</Name>"
                 b"<Properties><Content-Length>7</Content-Length><Etag>0x1</Etag></Properties></Blob></Blobs>"
                 b"<NextMarker>m2</NextMarker></EnumerationResults>",
             "m2": b"<EnumerationResults><Blobs><Blob><Name>p/a&amp;b</Name><Properties><Content-Length>0"
                   b"</Content-Length></Properties></Blob></Blobs><NextMarker/></EnumerationResults>"}
    monkeypatch.setattr(destination, "_list_page", lambda prefix, marker: pages[marker])
    assert [(o.key, o.size, o.etag) for o in destination.list("p/")] == [("p/ctl\x01x&y", 7, "0x1"), ("p/a&b", 0, None)]
    for bad in (b"<EnumerationResults><Blobs><Blob>", b"<E><Blob><Name>k</Name><Properties><Content-Length>-"
                b"</Content-Length></Properties></Blob></E>"):
        monkeypatch.setattr(destination, "_list_page", lambda prefix, marker, bad=bad: bad)
        with pytest.raises(objectstore.DestinationError, match="not a listing the service sends"):
            destination.list("p/")


class Bucket:
    """An in-memory destination holding index objects: what IndexCache.sync lists and reads."""

    def __init__(self) -> None:
        self.location = objectstore.parse("s3://bucket/f")
        self.objects: dict = {}

    def list(self, prefix: str) -> list:
        return [objectstore.ObjectInfo(k, len(v), etag=str(hash(v))) for k, v in sorted(self.objects.items())
                if k.startswith(prefix)]

    def get(self, key: str, write) -> int:  # noqa: ANN001
        write(self.objects[key])
        return len(self.objects[key])


def test_a_failed_write_of_the_index_cache_leaves_no_temporary_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached object's rows and the manifest are written through fs.replace: when the disk fills in the middle
    of a write, sync fails with that error, the cache keeps the manifest it had and no temporary file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bucket = Bucket()

    def put(n: int) -> str:
        key = fleet_index.object_key("f", fleet_index.PRUNER, "2026-12-07", 1796601600 + n)
        bucket.objects[key] = fleet_index.encode([fleet_index.tombstone("node-a", f"{n:012x}", 1796601600, 1.0)])
        return key

    cache = fleet.IndexCache(bucket, print)
    first = put(1)
    assert list(cache.sync()) == [first]
    directory = Path(cache.directory)
    kept = {p.name: p.read_bytes() for p in directory.iterdir()}
    written = fs.write_all

    def disk_full(fd: int, data: bytes) -> None:
        written(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    second = put(2)
    monkeypatch.setattr(fs, "write_all", disk_full)  # the new object's rows
    with pytest.raises(OSError, match="No space left"):
        cache.sync()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == kept
    monkeypatch.setattr(fs, "write_all", lambda fd, data: (disk_full if b'"objects"' in data else written)(fd, data))
    with pytest.raises(OSError, match="No space left"):  # the rows written, then the manifest's write fails
        cache.sync()
    [rows] = {p.name for p in directory.iterdir()} - set(kept)
    assert re.fullmatch(r"[0-9a-f]{32}\.ndjson", rows), rows
    assert {name: (directory / name).read_bytes() for name in kept} == kept
    monkeypatch.setattr(fs, "write_all", written)
    assert sorted(cache.sync()) == sorted([first, second])
