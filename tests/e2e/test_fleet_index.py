"""The fleet index (docs/shipping.md, "The fleet index") against real servers on loopback: SeaweedFS for S3 and
Azurite for Azure. Two nodes with their own stores ship real crashes (through the real kernel and gdb) to one
prefix; ``--remote`` reads the index, groups across nodes, counts its requests through a proxy, reindexes a
prefix written without an index, and skips hostile rows with one line each."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path
from typing import Optional

import objectstores
import pytest
from objectstores import corepipe
from support import NO_RATE_LIMIT, crash, installed_handler, need_tool, short_tempdir

from corepipe.domain import binaries, fleet_index

KINDS = ["seaweedfs", "azure"]


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path: Path):
    yield from objectstores.running(request.param, tmp_path)


def through(server: objectstores.Server, proxy: objectstores.CountingProxy) -> dict:
    """The server's credentials, pointed at ``proxy`` instead."""
    if isinstance(server, objectstores.Azurite):
        return {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string().replace(
            f"127.0.0.1:{server.port}", f"127.0.0.1:{proxy.port}")}
    return {**server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}


def test_two_nodes_ship_real_crashes_and_list_remote_groups_them_from_the_index(
        server, crasher: Path, bugs: dict, tmp_path: Path) -> None:
    need_tool("gdb")
    url = server.url("fleet")
    shipped = {}
    for node in ("node-a", "node-b"):
        workdir = short_tempdir()
        workdir.chmod(0o755)
        extra = f'ship_to = "{url}"\nship_node = "{node}"\nbinaries_host = true\n{NO_RATE_LIMIT}'
        with installed_handler(workdir, config_extra=extra) as handler:
            crash([str(crasher), "0", f"fleet-{node[-1]}"])
            # node-b's copy of the bug has no core: its signature is its crash site, which node-a's backtrace
            # signature of the same site takes in (as local grouping does).
            crash([str(bugs["bugs"]), "near-a", f"near-{node[-1]}"], core_limit=0 if node == "node-b" else -1)
            recs = [handler.wait_record(lambda r, c=c: r["comm"] == c) for c in (f"fleet-{node[-1]}",
                                                                                  f"near-{node[-1]}")]
        corepipe(handler.config, server.env, "ship", "--once")
        shipped[node] = recs
    assert shipped["node-b"][1]["signature"]["source"] == "crash site"
    assert shipped["node-a"][1]["signature"]["source"] == "backtrace"

    bucket = objectstores.Bucket(server)
    rows = bucket.rows("fleet")
    assert len(rows) == 4
    for row in rows:
        day, node = fleet_index.partition("fleet", row["_key"])
        assert node == row["node"], "a node wrote outside its own partition"
        assert day == row["time"][:10] and row["v"] == 1 and row["kind"] == "crash"
        assert row["keys"]["record"]["key"].startswith(f"fleet/{node}/")
        assert row["keys"]["record"]["key"] in bucket.keys(f"fleet/{node}/")
    by_id = {row["id"]: row for row in rows}
    for recs in shipped.values():
        for rec in recs:
            row = by_id[rec["id"]]
            assert row["signature"] == {k: rec["signature"].get(k) for k in
                                        ("hash", "text", "algorithm", "version", "source", "site")}
            assert row["container"]["runtime"] == rec["container"]["runtime"]
            assert row["exe"] == rec["exe"] and row["signal"]["name"] == "SIGSEGV"
            assert row["core_state"] == ("none" if rec["comm"] == "near-b" else "present")
            assert (row["keys"]["core"] is None) == (rec["comm"] == "near-b")
            saved = [binaries.stored_name(e) for e in rec["binaries"]["files"] if e.get("stored")]
            assert sorted(b["key"] for b in row["keys"]["binaries"]) == sorted(
                f"fleet/.build-id/{d}/{n}" for d, n in saved), rec["binaries"]

    assert any(row["keys"]["binaries"] for row in rows), "no saved binary: binaries_host is on"
    config = tmp_path / "reader.toml"
    config.write_text(f'store = "{tmp_path / "no-store"}"\n')
    cache = tmp_path / "cache"
    env = {**server.env, "XDG_CACHE_HOME": str(cache)}
    groups = json.loads(corepipe(config, env, "list", "--remote", url, "--group", "--json").stdout)
    assert sorted((g["count"], sorted(g["nodes"])) for g in groups) == [(2, ["node-a", "node-b"])] * 2
    near = next(g for g in groups if g["hash"] == shipped["node-a"][1]["signature"]["hash"])
    assert near["source"] == "backtrace" and near["cores"] == 1

    # The table has a NODE column; --node and --signature filter the index's rows.
    table = corepipe(config, env, "list", "--remote", url).stdout.splitlines()
    assert table[0].split("\t")[:2] == ["NODE", "ID"] and len(table) == 5
    only_b = json.loads(corepipe(config, env, "list", "--remote", url, "--node", "node-b", "--json").stdout)
    assert sorted(item["id"] for item in only_b) == sorted(r["id"] for r in shipped["node-b"])
    signed = json.loads(corepipe(config, env, "list", "--remote", url, "--signature", near["hash"], "--json").stdout)
    assert len(signed) == 2

    # info and extract go straight to the keys the index names; NODE/ID picks the node.
    target = shipped["node-a"][0]
    info = json.loads(corepipe(config, env, "info", "--remote", url, f"node-a/{target['id']}", "--json").stdout)
    assert info["id"] == target["id"] and info["pid"] == target["pid"]
    wrong = corepipe(config, env, "info", "--remote", url, f"node-b/{target['id']}", check=False)
    assert wrong.returncode == 1 and "no crash with id" in wrong.stderr
    out = tmp_path / "core"
    corepipe(config, env, "extract", "--remote", url, target["id"], "-o", str(out))
    assert out.stat().st_size == target["core"]["size"]


def test_remote_list_costs_index_objects_not_crashes(server, tmp_path: Path) -> None:
    """60 crashes of two nodes: a cold list sends one listing and one GET per index object, a warm one only the
    listing; never a request per crash."""
    url = server.url("fleet")
    for node in ("node-a", "node-b"):
        store = tmp_path / node
        for number in range(30):
            objectstores.stored_crash(store, 1024, comm=f"c{number % 3}")
        config = tmp_path / f"{node}.toml"
        config.write_text(f'store = "{store}"\nship_node = "{node}"\nship_to = "{url}"\n')
        corepipe(config, server.env, "ship", "--once")
    index = objectstores.Bucket(server).keys("fleet/_index/v1/")
    assert len(index) == 2 and all(f"node={n}/" in k for k, n in zip(index, ("node-a", "node-b")))

    proxy = objectstores.CountingProxy(server.port)
    try:
        env = {**through(server, proxy), "XDG_CACHE_HOME": str(tmp_path / "cache")}
        listed = json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout)
        assert len(listed) == 60 and {item["node"] for item in listed} == {"node-a", "node-b"}
        cold = dict(proxy.counts)
        assert proxy.total() <= len(index) + 1 and cold.get("HEAD", 0) == 0, cold
        proxy.counts.clear()
        groups = json.loads(corepipe(config, env, "list", "--remote", url, "--group", "--json").stdout)
        assert sorted(g["count"] for g in groups) == [60]  # stored_crash records have no signature: one group
        assert proxy.total() == 1, proxy.counts  # warm: the listing only
        proxy.counts.clear()
        info = json.loads(corepipe(config, env, "info", "--remote", url, f"node-b/{listed[-1]['id']}",
                                   "--json").stdout)
        assert info["id"] == listed[-1]["id"]
        assert proxy.total() == 2, proxy.counts  # the listing and the record
        proxy.counts.clear()
        # The same cached index as a SQL table (DuckDB).
        csv = corepipe(config, env, "fleet", "query", "--remote", url,
                       "SELECT node, count(*) AS n, count(DISTINCT comm) AS comms FROM crashes GROUP BY node "
                       "ORDER BY node").stdout
        assert csv.splitlines() == ["node,n,comms", "node-a,30,3", "node-b,30,3"]
        assert proxy.total() == 1, proxy.counts
    finally:
        proxy.close()
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    rows = json.loads(corepipe(config, env, "fleet", "query", "--remote", url, "--json",
                               "SELECT id, node, keys.record.key AS record, dump_time FROM crashes "
                               "WHERE node = 'node-b' ORDER BY timestamp, received").stdout)
    assert [(r["id"], r["node"]) for r in rows] == [(i["id"], i["node"]) for i in listed if i["node"] == "node-b"]
    assert rows[0]["record"].startswith("fleet/node-b/host/") and rows[0]["dump_time"][:10] == listed[0]["time"][:10]
    # The query sees the table and nothing else of this machine.
    denied = corepipe(config, env, "fleet", "query", "--remote", url, "SELECT * FROM read_csv('/etc/passwd')",
                      check=False)
    assert denied.returncode == 1 and len(denied.stderr.splitlines()) == 1 and "disabled" in denied.stderr, \
        denied.stderr


def test_reindex_a_prefix_shipped_without_an_index_and_tombstones(server, tmp_path: Path) -> None:
    url = server.url("old")
    for node in ("node-a", "node-b"):
        store = tmp_path / node
        for _ in range(3):
            objectstores.stored_crash(store, 4096)
        config = tmp_path / f"{node}.toml"
        config.write_text(f'store = "{store}"\nship_node = "{node}"\nship_to = "{url}"\n')
        corepipe(config, server.env, "ship", "--once")
    bucket = objectstores.Bucket(server)
    for key in bucket.keys("old/_index/"):  # as an older shipper left it: no index
        bucket.delete(key)
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout) == []

    out = corepipe(config, env, "fleet", "reindex", "--remote", url).stdout
    assert out.splitlines() == ["indexed 3 crashes of node-a", "indexed 3 crashes of node-b"]
    listed = json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout)
    assert len(listed) == 6 and all(item["core_state"] == "present" for item in listed)
    again = corepipe(config, env, "fleet", "reindex", "--remote", url).stdout
    assert again.strip() == f"every crash under {url} is already in its index"
    assert len(bucket.keys("old/_index/")) == 2  # one object per node: nothing written twice

    # A tombstone row (written by the node, in its own partition) removes the crash from every listing.
    gone = listed[0]
    tomb = {"v": 1, "kind": "tombstone", "id": gone["id"], "node": gone["node"], "timestamp": gone["timestamp"],
            "deleted": 1.0}
    bucket.put(f"old/_index/v1/dt={gone['time'][:10]}/node={gone['node']}/20991231T000000.000000Z-dead.ndjson.gz",
               gzip.compress(json.dumps(tomb).encode() + b"\n"))
    after = json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout)
    assert sorted(i["id"] for i in after) == sorted(i["id"] for i in listed[1:])
    count = corepipe(config, env, "fleet", "query", "--remote", url, "SELECT count(*) AS n FROM crashes").stdout
    assert count.splitlines() == ["n", "5"]


def test_a_new_destination_gets_what_the_old_one_has(server, tmp_path: Path) -> None:
    store = tmp_path / "node-a"
    ids = sorted(objectstores.stored_crash(store, 2048)[1]["id"] for _ in range(2))
    config = tmp_path / "a.toml"
    config.write_text(f'store = "{store}"\nship_node = "node-a"\n')
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for prefix in ("old", "new"):
        shipped = corepipe(config, env, "ship", "--once", "--to", server.url(prefix)).stdout
        assert sorted(shipped.split()[1::2]) == ids, shipped
        listed = json.loads(corepipe(config, env, "list", "--remote", server.url(prefix), "--json").stdout)
        assert sorted(item["id"] for item in listed) == ids
    assert corepipe(config, env, "ship", "--once", "--to", server.url("new")).stdout == ""  # nothing twice


def test_hostile_index_rows_are_skipped_with_one_line_each(server, tmp_path: Path) -> None:
    url = server.url("fleet")
    store = tmp_path / "node-a"
    objectstores.stored_crash(store, 1024)
    config = tmp_path / "a.toml"
    config.write_text(f'store = "{store}"\nship_node = "node-a"\nship_to = "{url}"\n')
    corepipe(config, server.env, "ship", "--once")
    bucket = objectstores.Bucket(server)
    good = bucket.rows("fleet")[0]
    good.pop("_key")
    day = good["time"][:10]

    def evil(**changes: object) -> dict:
        row = json.loads(json.dumps(good))
        row["node"] = "evil"
        row["keys"]["record"]["key"] = row["keys"]["record"]["key"].replace("fleet/node-a/", "fleet/evil/")
        row["keys"]["core"]["key"] = row["keys"]["core"]["key"].replace("fleet/node-a/", "fleet/evil/")
        row["keys"]["binaries"] = []
        for path, value in changes.items():
            target = row
            *parents, last = path.split("__")
            for name in parents:
                target = target[name]
            target[last] = value
        return row

    lone = evil(id="0123456789ab", keys__record={"key": "fleet/evil/host/20260101T000000Z-0123456789ab/record.json",
                                                 "size": 10}, keys__core=None, core__stored=False)
    lines = [
        b"{not json",
        json.dumps([1, 2]).encode(),
        json.dumps(evil(node="node-a")).encode(),  # claims another node's crash
        json.dumps(evil(keys__record={"key": good["keys"]["record"]["key"], "size": 10})).encode(),  # another's key
        json.dumps(evil(keys__core={"key": "fleet/evil/../node-a/x/core.zst", "size": 1})).encode(),
        json.dumps(evil(core__size="huge")).encode(),
        json.dumps(evil(keys__core={"key": evil()["keys"]["core"]["key"], "size": 1 << 60})).encode(),
        json.dumps(lone).encode(),
        json.dumps(lone).encode(),  # the same crash again
    ]
    base = f"fleet/_index/v1/dt={day}/node=evil/"
    bucket.put(base + "20260101T000000.000000Z-aaaa.ndjson.gz", gzip.compress(b"\n".join(lines) + b"\n"))
    bucket.put(base + "20260101T000000.000000Z-bbbb.ndjson.gz", gzip.compress(b"x" * (3 << 20)))  # one huge line
    bucket.put(base + "20260101T000000.000000Z-cccc.ndjson.gz", b"not gzip at all")
    bucket.put(f"fleet/_index/v1/dt={day}/node=../x.ndjson.gz", gzip.compress(b"{}\n"))
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = corepipe(config, env, "list", "--remote", url, "--json")
    listed = json.loads(proc.stdout)
    warnings = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    assert sorted((i["node"], i["id"]) for i in listed) == sorted([("node-a", good["id"]), ("evil", "0123456789ab")])
    expected = ["row 1: not JSON", "row 2: a list, not an object", "claims node 'node-a' but is in node=evil's",
                "keys.record 'fleet/node-a/", "keys.core 'fleet/evil/../node-a/x/core.zst' is outside",
                "core.size is 'huge', not a number", "keys.core.size is '1152921504606846976'",
                "crash evil/0123456789ab is in the index 2 times", "a line longer than 1048576 bytes",
                "not gzip data", "node=../x.ndjson.gz: not an index object"]
    for text in expected:
        assert sum(text in line for line in warnings) == 1, (text, warnings)
    assert len(warnings) == len(expected), warnings
    # The good crash of node-a is still node-a's, and --node evil does not make it the evil node's.
    evil_only = json.loads(corepipe(config, env, "list", "--remote", url, "--node", "evil", "--json").stdout)
    assert [i["id"] for i in evil_only] == ["0123456789ab"]
    both = corepipe(config, env, "fleet", "query", "--remote", url, "SELECT node, id FROM crashes ORDER BY node")
    assert both.stdout.splitlines() == ["node,id", "evil,0123456789ab", f"node-a,{good['id']}"]
    # A download stops at the size the row claims: a 10-byte record that is really larger is refused.
    real = json.loads(bucket.get(good["keys"]["record"]["key"]))
    bucket.put(lone["keys"]["record"]["key"], json.dumps({**real, "id": "0123456789ab"}).encode())
    refused = corepipe(config, env, "info", "--remote", url, "evil/0123456789ab", check=False)
    assert refused.returncode == 1 and "larger than the 10 bytes the index claims" in refused.stderr, refused.stderr
    # The index is unchanged: its rows are not warned about again; the key it cannot read is (it is listed).
    assert len(refused.stderr.splitlines()) == 2 and "not an index object" in refused.stderr, refused.stderr


@pytest.fixture(params=KINDS)
def big_crash(request: pytest.FixtureRequest, tmp_path: Path):
    """(server, crash directory, record, config) of a node with one crash whose 40 MiB core ships in parts."""
    server = objectstores.make(request.param, tmp_path)
    server.start()
    try:
        path, rec = objectstores.stored_crash(tmp_path / "store", 40 << 20)
        config = tmp_path / "c.toml"
        config.write_text(f'store = "{tmp_path / "store"}"\nship_node = "node-a"\n')
        yield server, path, rec, config
    finally:
        server.stop()


def ship_through(server: objectstores.Server, config: Path, **faults: object) -> subprocess.CompletedProcess:
    """``ship --once`` to the server's ``fleet`` prefix through a CountingProxy(**faults)."""
    proxy = objectstores.CountingProxy(server.port, **faults)  # type: ignore[arg-type]
    try:
        return corepipe(config, through(server, proxy), "ship", "--once", "--to", server.url("fleet"), check=False)
    finally:
        proxy.close()


@pytest.mark.parametrize("big_crash", ["seaweedfs"], indirect=True)  # ListParts is S3's
def test_a_denied_list_parts_starts_a_fresh_upload(big_crash: tuple) -> None:
    """A role without s3:ListMultipartUploadParts (the IRSA policy of old) must not stop the node: the upload
    that cannot be resumed is started afresh. The proxy fails part 3, then denies ListParts (a proxy, because
    SeaweedFS 4.48's s3.config cannot deny ListParts alone: an identity without "List" still lists parts, and one
    without "Read" loses the HEAD and GET the shipper needs too)."""
    server, path, rec, config = big_crash
    failing = {"parts": 0}

    def part_fails(method: str, path: str) -> Optional[int]:
        if method == "PUT" and "partNumber=" in path:
            failing["parts"] += 1
            return 500 if failing["parts"] > 2 else None
        return None

    first = ship_through(server, config, fault=part_fails)
    assert first.returncode == 1 and (path / "ship-progress.json").exists(), first.stderr
    again = ship_through(server, config, fault=lambda m, p: 403 if m == "GET" and "uploadId=" in p else None)
    assert again.returncode == 0 and f"shipped {rec['id']}" in again.stdout, again.stderr
    key = f"fleet/node-a/{path.relative_to(config.parent / 'store')}/core.zst"
    warnings = [line for line in again.stderr.splitlines() if "uploading it afresh" in line]
    print("STDERR", again.stderr, "STDOUT", again.stdout)
    assert len(warnings) == 1 and key in warnings[0] and "s3:ListMultipartUploadParts" in warnings[0], again.stderr
    assert [line for line in again.stderr.splitlines() if "access denied" in line] == warnings, again.stderr
    assert objectstores.Bucket(server).keys(key)


@pytest.mark.parametrize("big_crash", ["azure"], indirect=True)  # Get Block List is Azure's
def test_a_denied_block_list_starts_a_fresh_upload_on_azure(big_crash: tuple) -> None:
    """Azure's counterpart: the proxy fails block 3, then answers only the Get Block List of the uncommitted
    blocks with 403 (everything else, the committed list read back included, goes through): the upload starts
    afresh with one warning line, every block staged again, and ships."""
    server, path, rec, config = big_crash
    failing = {"blocks": 0}

    def block_fails(method: str, path: str) -> Optional[int]:
        if method == "PUT" and "comp=block&" in path + "&":
            failing["blocks"] += 1
            return 500 if failing["blocks"] > 2 else None
        return None

    first = ship_through(server, config, fault=block_fails)
    progress = json.loads((path / "ship-progress.json").read_text())
    assert first.returncode == 1 and [v for v in progress.values() if isinstance(v, dict) and v.get("blocks")], \
        first.stderr
    denied: list = []

    def list_denied(method: str, path: str) -> Optional[int]:
        if method == "GET" and "comp=blocklist" in path and "blocklisttype=uncommitted" in path:
            denied.append(path)
            return 403
        return None

    proxy = objectstores.CountingProxy(server.port, fault=list_denied)
    try:
        again = corepipe(config, through(server, proxy), "ship", "--once", "--to", server.url("fleet"), check=False)
    finally:
        proxy.close()
    assert again.returncode == 0 and f"shipped {rec['id']}" in again.stdout, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "uploading it afresh" in line]
    key = f"fleet/node-a/{path.relative_to(config.parent / 'store')}/core.zst"
    assert len(warnings) == 1 and key in warnings[0] and "blob read" in warnings[0] and denied, again.stderr
    assert proxy.counts.get("PUT", 0) >= 5  # every one of the 40 MiB core's blocks staged again, then committed
    assert objectstores.Bucket(server).get(key) == (path / "core.zst").read_bytes()


@pytest.mark.parametrize("big_crash", ["seaweedfs"], indirect=True)  # x-amz-checksum-* is S3's alone
def test_a_store_without_additional_checksums_is_verified_by_etag(big_crash: tuple) -> None:
    """Ceph RGW before Squid and older MinIO answer no x-amz-checksum-crc32: the core (in parts) still ships,
    each part checked against its ETag (its MD5). A proxy drops the checksum headers of SeaweedFS's answers."""
    server, _path, rec, config = big_crash
    shipped = ship_through(server, config, drop="x-amz-checksum-")
    assert shipped.returncode == 0 and f"shipped {rec['id']}" in shipped.stdout, shipped.stderr


def test_a_completed_upload_found_damaged_is_uploaded_again(big_crash: tuple) -> None:
    """The multipart upload completed, the read-back failed (a proxy answers 500 to its HEAD), and the object was
    then damaged: the next sweep uploads it again instead of failing its verification forever."""
    server, path, rec, config = big_crash
    key = f"fleet/node-a/{path.relative_to(config.parent / 'store')}/core.zst"
    first = ship_through(server, config, fault=lambda m, p: 500 if m == "HEAD" and "core.zst" in p else None)
    assert first.returncode == 1 and json.loads((path / "ship-progress.json").read_text())[key]["completed"], \
        first.stderr
    objectstores.Bucket(server).put(key, b"damaged")
    again = corepipe(config, server.env, "ship", "--once", "--to", server.url("fleet"), check=False)
    assert again.returncode == 0 and f"shipped {rec['id']}" in again.stdout, again.stderr
    assert len(objectstores.Bucket(server).get(key)) == rec["core"]["compressed_size"]
