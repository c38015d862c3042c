"""The fleet index read by another engine: ClickHouse's own engine, in-process (chdb), runs the definitions of
install/fleet/clickhouse.sql against SeaweedFS (the ``s3`` table function) and Azurite (the
``azureBlobStorage`` form the file documents) on loopback and must give the groups that
``corepipe list --remote --group`` gives (the crash-site rule, tombstones and compaction included); the
continuous ingest of install/fleet/clickhouse-queue.sql (S3Queue against SeaweedFS, the AzureQueue form the file
documents against Azurite) runs in chdb with ClickHouse's in-memory Keeper (tests/chdb_keeper.py) and must give
them too, as objects arrive, are compacted and tombstoned."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import objectstores
import pytest
from chdb_keeper import KeeperEngine
from objectstores import corepipe
from support import HERE, need

DEFINITIONS = HERE.parent / "install" / "fleet" / "clickhouse.sql"
QUEUE = HERE.parent / "install" / "fleet" / "clickhouse-queue.sql"
INDEX_PATH = "fleet/_index/v1/*/*/*.ndjson.gz"
A, B = "aaaa000000000001", "bbbb000000000002"


def _signature(hash_: str, source: str, site: str) -> dict:
    return {"hash": hash_, "text": f"frame-{hash_[:4]}", "algorithm": "frames", "version": 1, "source": source,
            "site": site}


def _statements(sql: str) -> list:
    """``sql`` split into statements at a ';' that ends a line (a connection string has ';' inside)."""
    return [s for s in re.split(r";\s*$", sql, flags=re.M) if s.strip() and not _comment_only(s)]


def _comment_only(statement: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in statement.splitlines())


def _filled(sql: str, server: objectstores.Server) -> str:
    """``sql`` (clickhouse.sql or clickhouse-queue.sql) filled in for ``server``; for Azurite its S3 call (s3() or
    S3Queue()) is replaced by the Azure form the file's header gives, so the documented form is the one tested."""
    if isinstance(server, objectstores.Azurite):
        azure = re.search(r"(azureBlobStorage|AzureQueue)\([^)]*\)", sql)
        call = {"azureBlobStorage": "s3", "AzureQueue": "S3Queue"}[azure.group(1)] \
            + "('{{INDEX_URL}}', '{{ACCESS_KEY}}', '{{SECRET_KEY}}', 'LineAsString')"
        assert sql.count(call) == 1, f"the file's {call} changed: update this test"
        return sql.replace(call, azure.group(0)).replace("{{CONNECTION_STRING}}", server.connection_string()) \
            .replace("{{CONTAINER}}", server.container).replace("{{INDEX_PATH}}", INDEX_PATH)
    return sql.replace("{{INDEX_URL}}", f"http://127.0.0.1:{server.port}/{server.bucket}/{INDEX_PATH}") \
        .replace("{{ACCESS_KEY}}", server.keys["AWS_ACCESS_KEY_ID"]) \
        .replace("{{SECRET_KEY}}", server.keys["AWS_SECRET_ACCESS_KEY"])


def _need_chdb() -> None:
    need(importlib.util.find_spec("chdb") is not None, "needs chdb (the test extra: pip install chdb)")


class Fleet:
    """Two nodes shipping to one prefix of ``server`` and a reader, all through the corepipe CLI."""

    def __init__(self, server: objectstores.Server, tmp_path: Path):
        self.server, self.tmp = server, tmp_path
        self.url = server.url("fleet")
        self.reader = tmp_path / "reader.toml"
        self.reader.write_text(f'store = "{tmp_path / "none"}"\n')
        self.env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def ship(self, node: str, crashes: list) -> None:
        """One sweep per crash (``(signature, when)``), so that a past day's second object compacts it."""
        store = self.tmp / node
        config = self.tmp / f"{node}.toml"
        config.write_text(f'store = "{store}"\nship_node = "{node}"\nship_to = "{self.url}"\n')
        for signature, when in crashes:
            objectstores.stored_crash(store, 512, signature=signature, when=when)
            corepipe(config, self.server.env, "ship", "--once")

    def prune(self, days: str) -> None:
        corepipe(self.reader, self.env, "prune", "--remote", self.url, "--max-age", days)

    def keys(self) -> list:
        return objectstores.Bucket(self.server).keys("fleet/_index/")

    def groups(self) -> list:
        """``list --remote --group``'s groups as sorted (hash, count, nodes)."""
        ours = json.loads(corepipe(self.reader, self.env, "list", "--remote", self.url, "--group", "--json").stdout)
        return sorted((g["hash"], g["count"], sorted(g["nodes"])) for g in ours)


def _engine_groups(found: str) -> list:
    return sorted((g["hash"], int(g["count"]), g["nodes"]) for g in map(json.loads, found.splitlines()))


@pytest.mark.parametrize("kind", ["seaweedfs", "azure"])
def test_clickhouse_definitions_give_the_groups_of_list_remote_group(tmp_path: Path, kind: str) -> None:
    _need_chdb()
    import chdb.session

    server = objectstores.make(kind, tmp_path)
    server.start()
    try:
        fleet = Fleet(server, tmp_path)
        past = time.time() - 3 * 86400
        fleet.ship("node-a", [(_signature(A, "backtrace", "bugs.c:10"), None)] * 2 + [(None, None)]
                   + [(_signature(A, "backtrace", "bugs.c:10"), past), (_signature(B, "backtrace", "x.c:1"), past)])
        fleet.ship("node-b", [(_signature("cccc000000000003", "crash site", "bugs.c:10"), None),
                              (_signature(B, "backtrace", "x.c:1"), None)])
        bucket = objectstores.Bucket(server)
        [old] = bucket.keys(f"fleet/_index/v1/dt={time.strftime('%Y-%m-%d', time.gmtime(past))}/node=node-a/")
        merged = bucket.get(old)
        fleet.prune("2")
        assert old not in fleet.keys()  # all its crashes pruned: the pruner deleted it
        bucket.put(old, merged)  # as a node's merge of that day landing late: the tombstones must hide its rows
        keys = fleet.keys()
        assert any("node=_prune" in k for k in keys) and len([k for k in keys if "node=node-a" in k]) == 4, keys

        expected = fleet.groups()
        assert (A, 3, ["node-a", "node-b"]) in expected and ("-", 1, ["node-a"]) in expected, expected

        session = chdb.session.Session(str(tmp_path / "chdb"))
        try:
            for statement in _statements(_filled(DEFINITIONS.read_text(), server)):
                session.query(statement)
            found = session.query("SELECT hash, count, nodes FROM fleet_groups", "JSONEachRow").bytes().decode()
            crashes = session.query("SELECT count() FROM fleet_crashes", "CSV").bytes().decode().strip()
        finally:
            session.close()
        assert _engine_groups(found) == expected
        assert int(crashes) == sum(count for _, count, _ in expected)
    finally:
        server.stop()


def _ingested(engine: KeeperEngine, fleet: Fleet) -> set:
    """The objects in fleet_index_raw once it holds every index object now in the bucket (the queue polls
    every 1-10 s); an assertion after two minutes."""
    deadline = time.monotonic() + 120
    while True:
        keys = set(fleet.keys())
        objects = {row["object"] for row in engine.rows("SELECT DISTINCT object FROM fleet_index_raw")}
        if keys <= objects:
            return objects
        assert time.monotonic() < deadline, f"the queue did not ingest {sorted(keys - objects)}"
        time.sleep(1)


def _same_groups(engine: KeeperEngine, fleet: Fleet) -> list:
    expected = fleet.groups()
    assert _engine_groups(engine.query("SELECT hash, count, nodes FROM fleet_groups")) == expected
    crashes = engine.rows("SELECT count() AS n FROM fleet_crashes")[0]["n"]
    assert int(crashes) == sum(count for _, count, _ in expected)
    return expected


@pytest.mark.parametrize("kind", ["seaweedfs", "azure"])
def test_queue_ingest_gives_the_groups_of_list_remote_group(tmp_path: Path, kind: str) -> None:
    """clickhouse-queue.sql (S3Queue, or AzureQueue for Azurite) and then clickhouse.sql's rules (all but its
    own fleet_lines) in a chdb with a Keeper: the groups match after the first objects, after new ones (a
    compaction among them: the replaced object's rows stay ingested and must not count twice), after a prune's
    tombstones and with every row ingested twice."""
    _need_chdb()
    server = objectstores.make(kind, tmp_path)
    server.start()
    engine = None
    try:
        fleet = Fleet(server, tmp_path)
        past = time.time() - 3 * 86400
        fleet.ship("node-a", [(_signature(A, "backtrace", "bugs.c:10"), None)] * 2
                   + [(_signature(B, "backtrace", "x.c:1"), past)])
        fleet.ship("node-b", [(_signature("cccc000000000003", "crash site", "bugs.c:10"), None)])

        engine = KeeperEngine(tmp_path)
        rules = _statements(DEFINITIONS.read_text())
        assert len([s for s in rules if "CREATE VIEW fleet_lines" in s]) == 1, "clickhouse.sql's fleet_lines moved"
        queue = _filled(QUEUE.read_text(), server)
        assert queue.count("polling_max_timeout_ms = 60000") == 1, "the queue's polling changed: update this test"
        queue = queue.replace("polling_max_timeout_ms = 60000", "polling_max_timeout_ms = 1000")  # for speed only
        for statement in _statements(queue) + [s for s in rules if "CREATE VIEW fleet_lines" not in s]:
            engine.query(statement)
        first = _ingested(engine, fleet)
        assert _same_groups(engine, fleet) == [(A, 3, ["node-a", "node-b"]), (B, 1, ["node-a"])]

        fleet.ship("node-a", [(_signature(A, "backtrace", "bugs.c:10"), past)])  # the past day is compacted
        fleet.ship("node-b", [(None, None)])
        replaced = first - set(fleet.keys())
        assert replaced, "no index object was compacted away: the test no longer covers replaced objects"
        assert replaced <= _ingested(engine, fleet)  # their rows stay in the table beside the merged object's
        assert _same_groups(engine, fleet) == [("-", 1, ["node-b"]), (A, 4, ["node-a", "node-b"]),
                                               (B, 1, ["node-a"])]

        fleet.prune("2")  # tombstones of the past day's crashes, in node=_prune
        _ingested(engine, fleet)
        assert _same_groups(engine, fleet) == [("-", 1, ["node-b"]), (A, 3, ["node-a", "node-b"])]

        # past tracked_files_limit the queue reads an object again: its rows twice change nothing
        engine.query("INSERT INTO fleet_index_raw SELECT * FROM fleet_index_raw")
        assert _same_groups(engine, fleet) == [("-", 1, ["node-b"]), (A, 3, ["node-a", "node-b"])]
    finally:
        if engine is not None:
            engine.close()
        server.stop()
