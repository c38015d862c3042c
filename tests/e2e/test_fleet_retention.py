"""Retention and compaction of the fleet index (docs/shipping.md, "Compaction" and "Retention in the bucket")
against real servers on loopback (SeaweedFS for S3, Azurite): a node's index objects of one day merged into one
without a crash counted twice, the merge undone when its read-back fails, and ``prune --remote`` deleting real
crashes of two nodes, with tombstones in its own partition that every ``--remote`` reader honours."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import objectstores
import pytest
from objectstores import Bucket, corepipe
from support import NO_RATE_LIMIT, crash, installed_handler, need_tool, short_tempdir

from corepipe.domain import fleet_index
from corepipe.platform.store import SHIP_INDEX

KINDS = ["seaweedfs", "azure"]


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path: Path):
    yield from objectstores.running(request.param, tmp_path)


def partition_keys(bucket: Bucket, prefix: str, node: str, day: str) -> list:
    return bucket.keys(fleet_index.partition_root(prefix, node, day))


def past_node(server: objectstores.Server, tmp_path: Path, days: int) -> tuple:
    """(store, config, dump time, its day) of node-a shipping to the server's ``fleet`` prefix, ``days`` ago."""
    store = tmp_path / "node-a"
    config = tmp_path / "a.toml"
    config.write_text(f'store = "{store}"\nship_node = "node-a"\nship_to = "{server.url("fleet")}"\n')
    when = time.time() - days * 86400
    return store, config, when, time.strftime("%Y-%m-%d", time.gmtime(when))


def test_a_past_days_index_objects_are_compacted_into_one_and_never_counted_twice(server, tmp_path: Path) -> None:
    """Three sweeps each ship one crash of three days ago: the second and third merge the day's objects into one
    (the third's replacing the second's). With the second's object put back, as a reader finds the bucket between
    a compaction's write and its deletions, every crash is listed once, without a warning."""
    url = server.url("fleet")
    store, config, when, day = past_node(server, tmp_path, 3)
    bucket = Bucket(server)
    ids, kept = [], {}
    for sweep in range(3):
        ids.append(objectstores.stored_crash(store, 1024, when=when + sweep)[1]["id"])
        corepipe(config, server.env, "ship", "--once")
        keys = partition_keys(bucket, "fleet", "node-a", day)
        assert len(keys) == 1, (sweep, keys)
        kept[sweep] = (keys[0], bucket.get(keys[0]))
    rows = [json.loads(line) for line in gzip.decompress(kept[2][1]).splitlines()]
    assert rows[0]["kind"] == "replaces" and kept[1][0].rsplit("/", 1)[1] in rows[0]["objects"]
    assert sorted(r["id"] for r in rows[1:]) == sorted(ids)
    assert json.loads((store / SHIP_INDEX).read_text())["days"] == {day: 1}  # down to one object

    bucket.put(*kept[1])  # the compaction before, as if its deletions had not happened yet
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = corepipe(config, env, "list", "--remote", url, "--json")
    assert sorted(item["id"] for item in json.loads(proc.stdout)) == sorted(ids)
    assert proc.stderr == ""
    count = corepipe(config, env, "fleet", "query", "--remote", url, "SELECT count(*) AS n FROM crashes").stdout
    assert count.splitlines() == ["n", "3"]


def test_a_compaction_whose_read_back_fails_keeps_the_objects_it_would_replace(tmp_path: Path) -> None:
    """The proxy fails the GET of the compacted object (the read-back): the sweep says so, the compacted object is
    deleted again and the two objects it would replace stay; the next sweep compacts them."""
    server = objectstores.make("seaweedfs", tmp_path)
    server.start()
    try:
        store, config, when, day = past_node(server, tmp_path, 2)
        bucket = Bucket(server)
        objectstores.stored_crash(store, 1024, when=when)
        corepipe(config, server.env, "ship", "--once")
        first = partition_keys(bucket, "fleet", "node-a", day)
        objectstores.stored_crash(store, 1024, when=when + 1)
        seen = {"listed": False, "late": set()}

        def read_back_fails(method: str, path: str):  # noqa: ANN202
            where = path.split("?")[0]
            if method == "GET" and "list-type" in path:
                seen["listed"] = True
            elif method == "PUT" and "_index" in where and seen["listed"]:
                seen["late"].add(where)  # written after the partition was listed: the compacted object
            elif method == "GET" and where in seen["late"]:
                return 500
            return None

        proxy = objectstores.CountingProxy(server.port, fault=read_back_fails)
        try:
            env = {**server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
            failed = corepipe(config, env, "ship", "--once", check=False)
        finally:
            proxy.close()
        assert failed.returncode == 1 and "cannot compact the index" in failed.stderr, failed.stderr
        assert "the objects it would replace are kept" in failed.stderr and seen["late"]
        kept = partition_keys(bucket, "fleet", "node-a", day)
        assert len(kept) == 2 and set(first) < set(kept), kept
        again = corepipe(config, server.env, "ship", "--once")
        assert again.returncode == 0
        merged = partition_keys(bucket, "fleet", "node-a", day)
        assert len(merged) == 1 and merged[0] not in kept
    finally:
        server.stop()


def test_prune_remote_deletes_two_nodes_crashes_with_tombstones_every_reader_honours(
        server, bugs: dict, crasher: Path, tmp_path: Path) -> None:
    need_tool("gdb")
    url = server.url("fleet")
    shipped: dict = {}
    for node in ("node-a", "node-b"):
        workdir = short_tempdir()
        workdir.chmod(0o755)
        extra = f'ship_to = "{url}"\nship_node = "{node}"\nbinaries_host = true\n{NO_RATE_LIMIT}'
        with installed_handler(workdir, config_extra=extra) as handler:
            crash([str(bugs["bugs"]), "near-a", f"near-{node[-1]}"])
            shipped[node] = [handler.wait_record(lambda r, c=f"near-{node[-1]}": r["comm"] == c)]
            if node == "node-a":
                crash([str(crasher), "0", "lone-a"])
                shipped[node].append(handler.wait_record(lambda r: r["comm"] == "lone-a"))
        corepipe(handler.config, server.env, "ship", "--once")
    old, newer = shipped["node-a"][0], shipped["node-b"][0]
    assert old["signature"]["hash"] == newer["signature"]["hash"]
    bucket = Bucket(server)
    before = bucket.keys("fleet/")
    row = {r["id"]: r for r in bucket.rows("fleet")}
    assert row[old["id"]]["keys"]["binaries"], "binaries_host is on: the bug's executable is saved"
    shared = {b["key"] for b in row[old["id"]]["keys"]["binaries"]}
    assert shared == {b["key"] for b in row[newer["id"]]["keys"]["binaries"]}  # one object for both nodes
    lone_binaries = {b["key"] for b in row[shipped["node-a"][1]["id"]]["keys"]["binaries"]}
    config = tmp_path / "reader.toml"
    config.write_text(f'store = "{tmp_path / "no-store"}"\n')
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    dry = corepipe(config, env, "prune", "--remote", url, "--keep-per-signature", "1", "--dry-run").stdout
    assert dry.splitlines() == [f"would delete node-a/{old['id']} (not among the 1 newest of its signature)"]
    assert bucket.keys("fleet/") == before

    out = corepipe(config, env, "prune", "--remote", url, "--keep-per-signature", "1").stdout
    assert out.splitlines() == [f"deleted node-a/{old['id']} (not among the 1 newest of its signature)"]
    gone = {row[old["id"]]["keys"]["record"]["key"], row[old["id"]]["keys"]["core"]["key"]}
    index_before = {k for k in before if "/_index/" in k}
    after = set(bucket.keys("fleet/"))
    assert after & gone == set() and shared <= after  # node-b's crash still names the shared binary
    assert {k for k in after if "/_index/" in k} - index_before == {
        k for k in after if "/node=_prune/" in k} and len({k for k in after if "/node=_prune/" in k}) == 1
    assert index_before <= after  # the pruner wrote nothing in, and removed nothing from, a node's partition
    tomb = [r for r in bucket.rows("fleet") if r["kind"] == "tombstone"]
    assert [(t["node"], t["id"]) for t in tomb] == [("node-a", old["id"])]

    # Every --remote reader: list, --group, info, extract, debug and fleet query.
    listed = json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout)
    assert sorted(i["id"] for i in listed) == sorted([newer["id"], shipped["node-a"][1]["id"]])
    groups = json.loads(corepipe(config, env, "list", "--remote", url, "--group", "--json").stdout)
    assert sorted((g["count"], g["nodes"]) for g in groups) == [(1, ["node-a"]), (1, ["node-b"])]
    for command in (["info", "--remote", url, f"node-a/{old['id']}"],
                    ["extract", "--remote", url, old["id"], "-o", str(tmp_path / "core")],
                    ["debug", "--remote", url, old["id"], "--", "-batch", "-ex", "bt"]):
        refused = corepipe(config, env, *command, check=False)
        assert refused.returncode == 1 and f"no crash with id {old['id']}" in refused.stderr, (command, refused)
    count = corepipe(config, env, "fleet", "query", "--remote", url, "SELECT count(*) AS n FROM crashes").stdout
    assert count.splitlines() == ["n", "2"]

    # Everything older than now: the rest goes, and with it every binary (no remaining crash names one).
    out = corepipe(config, env, "prune", "--remote", url, "--max-age", "0").stdout.splitlines()
    assert len(out) == 3 and out[-1] == f"deleted {len(shared | lone_binaries)} saved binaries no remaining crash " \
                                        "names"
    left = bucket.keys("fleet/")
    assert [k for k in left if "/_index/" not in k and "/_budget/" not in k] == [], left  # markers: the budget's
    assert json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout) == []
    assert corepipe(config, env, "prune", "--remote", url, "--max-age", "0").stdout.strip() == \
        f"nothing under {url} to prune"
