"""The fleet index read in place by another engine: ClickHouse's own engine, in-process (chdb), runs the
definitions of install/fleet/clickhouse.sql against SeaweedFS (the ``s3`` table function) and Azurite (the
``azureBlobStorage`` form the file documents) on loopback and must give the groups that
``corepipe list --remote --group`` gives (the crash-site rule, tombstones and compaction included)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import objectstores
import pytest
from objectstores import corepipe
from support import HERE, need

DEFINITIONS = HERE.parent / "install" / "fleet" / "clickhouse.sql"


def _signature(hash_: str, source: str, site: str) -> dict:
    return {"hash": hash_, "text": f"frame-{hash_[:4]}", "algorithm": "frames", "version": 1, "source": source,
            "site": site}


def _definitions(server: objectstores.Server) -> str:
    """install/fleet/clickhouse.sql filled in for ``server``; for Azurite the s3() call is replaced by the
    azureBlobStorage() form the file's header gives, so the documented form is the one tested."""
    sql = DEFINITIONS.read_text()
    path = "fleet/_index/v1/*/*/*.ndjson.gz"
    if isinstance(server, objectstores.Azurite):
        azure = re.search(r"azureBlobStorage\([^)]*\)", sql).group(0) \
            .replace("{{CONNECTION_STRING}}", server.connection_string()) \
            .replace("{{CONTAINER}}", server.container).replace("{{INDEX_PATH}}", path)
        call = "s3('{{INDEX_URL}}', '{{ACCESS_KEY}}', '{{SECRET_KEY}}', 'LineAsString')"
        assert sql.count(call) == 1, "the s3() call of fleet_lines changed: update this test"
        return sql.replace(call, azure)
    return sql.replace("{{INDEX_URL}}", f"http://127.0.0.1:{server.port}/{server.bucket}/{path}") \
        .replace("{{ACCESS_KEY}}", server.keys["AWS_ACCESS_KEY_ID"]) \
        .replace("{{SECRET_KEY}}", server.keys["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.parametrize("kind", ["seaweedfs", "azure"])
def test_clickhouse_definitions_give_the_groups_of_list_remote_group(tmp_path: Path, kind: str) -> None:
    try:
        import chdb.session
    except ImportError:
        chdb = None
    need(chdb is not None, "needs chdb (the test extra: pip install chdb)")
    server = objectstores.make(kind, tmp_path)
    server.start()
    try:
        url = server.url("fleet")
        a, b = "aaaa000000000001", "bbbb000000000002"
        past = time.time() - 3 * 86400
        plan = {"node-a": [(_signature(a, "backtrace", "bugs.c:10"), None)] * 2 + [(None, None)]
                + [(_signature(a, "backtrace", "bugs.c:10"), past), (_signature(b, "backtrace", "x.c:1"), past)],
                "node-b": [(_signature("cccc000000000003", "crash site", "bugs.c:10"), None),
                           (_signature(b, "backtrace", "x.c:1"), None)]}
        for node, crashes in plan.items():
            store = tmp_path / node
            config = tmp_path / f"{node}.toml"
            config.write_text(f'store = "{store}"\nship_node = "{node}"\nship_to = "{url}"\n')
            for signature, when in crashes:  # one sweep each: the past day's two objects are compacted
                objectstores.stored_crash(store, 512, signature=signature, when=when)
                corepipe(config, server.env, "ship", "--once")
        reader = tmp_path / "reader.toml"
        reader.write_text(f'store = "{tmp_path / "none"}"\n')
        env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        corepipe(reader, env, "prune", "--remote", url, "--max-age", "2")
        keys = objectstores.Bucket(server).keys("fleet/_index/")
        assert any("node=_prune" in k for k in keys) and len([k for k in keys if "node=node-a" in k]) == 4, keys

        ours = json.loads(corepipe(reader, env, "list", "--remote", url, "--group", "--json").stdout)
        expected = sorted((g["hash"], g["count"], sorted(g["nodes"])) for g in ours)
        assert (a, 3, ["node-a", "node-b"]) in expected and ("-", 1, ["node-a"]) in expected, expected

        sql = _definitions(server)
        session = chdb.session.Session(str(tmp_path / "chdb"))
        try:
            # a statement ends with ';' at the end of a line (a connection string has ';' inside)
            for statement in (s for s in re.split(r";\s*$", sql, flags=re.M) if s.strip() and not _comment_only(s)):
                session.query(statement)
            found = session.query("SELECT hash, count, nodes FROM fleet_groups", "JSONEachRow").bytes().decode()
            crashes = session.query("SELECT count() FROM fleet_crashes", "CSV").bytes().decode().strip()
        finally:
            session.close()
        theirs = sorted((g["hash"], int(g["count"]), g["nodes"]) for g in map(json.loads, found.splitlines()))
        assert theirs == expected
        assert int(crashes) == sum(g["count"] for g in ours)
    finally:
        server.stop()


def _comment_only(statement: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in statement.splitlines())
