"""Retention and compaction of the fleet index (docs/shipping.md, "Compaction" and "Retention in the bucket")
against real servers on loopback (SeaweedFS for S3, Azurite): a node's index objects of one day merged into one
without a crash counted twice, the merge undone when its read-back fails, and ``prune --remote`` deleting real
crashes of two nodes, with tombstones in its own partition that every ``--remote`` reader honours."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

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


def backdate(store: Path, crash: str, when: float) -> None:
    """The record of ``crash`` in ``store`` as if it had been dumped at ``when`` (the kernel dumps only now)."""
    path = next(store.glob(f"**/*-{crash}/record.json"))
    rec = json.loads(path.read_text())
    rec.update(timestamp=int(when), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)))
    path.write_text(json.dumps(rec))


def ship_real_crashes(server: objectstores.Server, bugs: dict, crasher: Path, when: Optional[float] = None) -> dict:
    """node -> records of the real crashes node-a and node-b ship to ``fleet``: one of the bug's (one signature for
    both nodes), and node-a one of the crasher; the bug's dumped at ``when`` (its record edited before shipping)
    when given."""
    need_tool("gdb")
    shipped: dict = {}
    for node in ("node-a", "node-b"):
        workdir = short_tempdir()
        workdir.chmod(0o755)
        extra = f'ship_to = "{server.url("fleet")}"\nship_node = "{node}"\nbinaries_host = true\n{NO_RATE_LIMIT}'
        with installed_handler(workdir, config_extra=extra) as handler:
            crash([str(bugs["bugs"]), "near-a", f"near-{node[-1]}"])
            shipped[node] = [handler.wait_record(lambda r, c=f"near-{node[-1]}": r["comm"] == c)]
            if node == "node-a":
                crash([str(crasher), "0", "lone-a"])
                shipped[node].append(handler.wait_record(lambda r: r["comm"] == "lone-a"))
        if when is not None:
            backdate(handler.store, shipped[node][0]["id"], when)
        corepipe(handler.config, server.env, "ship", "--once")
    return shipped


def test_prune_remote_deletes_two_nodes_crashes_with_tombstones_every_reader_honours(
        server, bugs: dict, crasher: Path, tmp_path: Path) -> None:
    url = server.url("fleet")
    shipped = ship_real_crashes(server, bugs, crasher)
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
    assert out[2:] == ["deleted 2 index objects whose crashes are all pruned",  # both nodes' (all rows pruned)
                       f"deleted {len(shared | lone_binaries)} saved binaries no remaining crash names"], out
    left = bucket.keys("fleet/")
    assert [k for k in left if "/node=_prune/" not in k and "/_budget/" not in k] == [], left  # markers: the budget's
    assert json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout) == []
    assert corepipe(config, env, "prune", "--remote", url, "--max-age", "0").stdout.strip() == \
        f"nothing under {url} to prune"


def settle(cache: Path) -> None:
    """The pruner's clocks (remote_prune.CLOCKS in the index cache) as if SETTLE had passed since they started."""
    from corepipe.services import remote_prune

    [path] = cache.glob(f"corepipe/index/*/{remote_prune.CLOCKS}")
    value = json.loads(path.read_text())
    assert value["days"], "a clock was started"
    path.write_text(json.dumps({"days": {d: t - remote_prune.SETTLE - 1 for d, t in value["days"].items()}}))


def index_keys(bucket: Bucket, day: str = "") -> list:
    return bucket.keys(f"fleet/_index/v1/{f'dt={day}/' if day else ''}")


def test_prune_remote_removes_a_pruned_days_index_objects_then_its_tombstones(
        server, bugs: dict, crasher: Path, tmp_path: Path) -> None:
    """Real crashes of two nodes, two of them (one per node) dumped three days ago: ``prune --max-age 2`` deletes
    them, and with them both nodes' index objects of that day (every row in them is pruned); the day's tombstones
    stay until the pruner has seen them hide nothing for SETTLE, and go on the run after. Today's objects are never
    touched, and every reader gives the same answer at each step."""
    url = server.url("fleet")
    three_days_ago = time.time() - 3 * 86400
    day = time.strftime("%Y-%m-%d", time.gmtime(three_days_ago))
    shipped = ship_real_crashes(server, bugs, crasher, three_days_ago)
    old = {node: records[0]["id"] for node, records in shipped.items()}
    live = shipped["node-a"][1]["id"]
    bucket = Bucket(server)
    before = index_keys(bucket)
    nodes_of_day = [k for k in index_keys(bucket, day) if "/node=_prune/" not in k]
    assert len(nodes_of_day) == 2, before
    today = [k for k in before if f"/dt={day}/" not in k]
    assert len(today) == 1, before
    config = tmp_path / "reader.toml"
    config.write_text(f'store = "{tmp_path / "no-store"}"\n')
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def readers_show_only_the_live_crash() -> None:
        listed = json.loads(corepipe(config, env, "list", "--remote", url, "--json").stdout)
        assert [(i["node"], i["id"]) for i in listed] == [("node-a", live)]
        groups = json.loads(corepipe(config, env, "list", "--remote", url, "--group", "--json").stdout)
        assert [(g["count"], g["nodes"]) for g in groups] == [(1, ["node-a"])]
        assert live in corepipe(config, env, "info", "--remote", url, f"node-a/{live}").stdout
        for node, crash_id in old.items():
            refused = corepipe(config, env, "info", "--remote", url, f"{node}/{crash_id}", check=False)
            assert refused.returncode == 1 and f"no crash with id {crash_id}" in refused.stderr, refused
        query = "SELECT count(*) AS n FROM crashes"
        assert corepipe(config, env, "fleet", "query", "--remote", url, query).stdout.splitlines() == ["n", "1"]

    out = corepipe(config, env, "prune", "--remote", url, "--max-age", "2").stdout.splitlines()
    assert sorted(out[:2]) == sorted(f"deleted {n}/{i} (older than 2 days)" for n, i in old.items()), out
    assert "deleted 2 index objects whose crashes are all pruned" in out, out
    after = index_keys(bucket)
    tombstones = [k for k in after if "/node=_prune/" in k]
    assert [k.split("/")[-3] for k in tombstones] == [f"dt={day}"], after
    assert sorted(after) == sorted(today + tombstones)  # both nodes' objects of that day gone, today's untouched
    readers_show_only_the_live_crash()

    again = corepipe(config, env, "prune", "--remote", url, "--max-age", "2").stdout
    assert again.strip() == f"nothing under {url} to prune"  # too early for the tombstones
    assert index_keys(bucket) == after
    settle(tmp_path / "cache")
    last = corepipe(config, env, "prune", "--remote", url, "--max-age", "2").stdout
    assert last.splitlines() == [f"deleted {len(tombstones)} tombstone objects that hide no crash any more"]
    assert index_keys(bucket) == today and index_keys(bucket, day) == []
    assert len(today) < len(before)
    readers_show_only_the_live_crash()


def a_day_to_prune(server: objectstores.Server, tmp_path: Path) -> tuple:
    """(day, crash ids, index object) of node-a's two crashes of three days ago, shipped in two sweeps, so merged
    into one object, and node-a's crash of today (which stays)."""
    store, config, when, day = past_node(server, tmp_path, 3)
    pruned = []
    for sweep in range(2):
        pruned.append(objectstores.stored_crash(store, 1024, when=when + sweep)[1]["id"])
        corepipe(config, server.env, "ship", "--once")
    objectstores.stored_crash(store, 1024)
    corepipe(config, server.env, "ship", "--once")
    [merged] = partition_keys(Bucket(server), "fleet", "node-a", day)
    return day, pruned, merged


def test_a_dry_run_lists_the_index_clean_up_a_prune_does_and_changes_nothing(server, tmp_path: Path) -> None:
    """``prune --remote --dry-run`` says which index objects and tombstone objects the run would delete, and
    which day's tombstones wait for the hour (and till when); it deletes nothing and neither starts nor moves a
    clock. Each real run after a dry run deletes exactly what the dry run listed: node-a's object of a day pruned
    whole, then (a node's merge of that object put back after the run) that object again, while the day's
    tombstones wait for a listing that does not find it, then the tombstones."""
    from corepipe.services import remote_prune

    url = server.url("fleet")
    day, pruned, merged = a_day_to_prune(server, tmp_path)
    bucket = Bucket(server)
    data = bucket.get(merged)
    cache = tmp_path / "cache"
    env = {**server.env, "XDG_CACHE_HOME": str(cache)}
    reader = tmp_path / "reader.toml"
    reader.write_text(f'store = "{tmp_path / "no-store"}"\n')

    def clocks() -> dict:
        return {p.name: p.read_bytes() for p in cache.glob(f"corepipe/index/*/{remote_prune.CLOCKS}")}

    def dry_run() -> list:
        """Its lines; the bucket (every key, every index object's bytes) and the clocks as they were."""
        objects = {k: bucket.get(k) if "/_index/" in k else None for k in bucket.keys("fleet/")}
        kept = clocks()
        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2", "--dry-run").stdout.splitlines()
        assert {k: bucket.get(k) if "/_index/" in k else None for k in bucket.keys("fleet/")} == objects
        assert clocks() == kept
        return out

    def real_run(listed: list) -> list:
        """Its lines, once it deleted exactly the keys the dry run's ``would delete`` lines named."""
        before = set(bucket.keys("fleet/"))
        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2").stdout.splitlines()
        gone = before - set(bucket.keys("fleet/"))
        assert sorted(k for k in gone if "/_index/" in k) == sorted(
            line.split()[2] for line in listed if line.startswith("would delete fleet/_index/")), (gone, listed)
        return out

    wait = f"tombstones of {day} kept: they hide no crash; a run (not --dry-run) starts their hour"
    first = dry_run()
    assert sorted(first[:2]) == sorted(f"would delete node-a/{i} (older than 2 days)" for i in pruned), first
    assert first[2:] == [f"would delete {merged} (an index object whose crashes are all pruned)", wait], first
    assert clocks() == {}  # no clock started
    out = real_run(first)
    assert out[2:] == ["deleted 1 index objects whose crashes are all pruned"], out
    [tombstone] = partition_keys(bucket, "fleet", fleet_index.PRUNER, day)
    [started] = json.loads(next(iter(clocks().values())))["days"].values()

    def utc(stamp: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))

    assert dry_run() == [f"tombstones of {day} kept: they hide no crash since {utc(started)}; a run from "
                         f"{utc(started + remote_prune.SETTLE)} deletes their 1 objects",
                         f"nothing under {url} to prune"]
    settle(cache)
    assert dry_run() == [f"would delete {tombstone} (tombstones that hide no crash any more)"]
    # A node's merge of the pruned object lands after the run (as it read the object before the pruner deleted it).
    bucket.put(merged, data)
    listed = dry_run()
    assert listed == [f"would delete {merged} (an index object whose crashes are all pruned)", wait], listed
    assert real_run(listed) == ["deleted 1 index objects whose crashes are all pruned"]
    settle(cache)
    listed = dry_run()
    assert listed == [f"would delete {tombstone} (tombstones that hide no crash any more)"], listed
    assert real_run(listed) == ["deleted 1 tombstone objects that hide no crash any more"]
    assert index_keys(bucket, day) == []
    assert dry_run() == [f"nothing under {url} to prune"]


def test_a_compactions_object_written_after_the_pruners_check_keeps_the_tombstones(tmp_path: Path) -> None:
    """The race with a node compacting the partition the pruner empties: node-a's merge of two objects of a pruned
    day, as a compaction that read them before the pruner deleted them writes it, appears (1) after the run that
    found the day clean (planted between runs) and (2) while the next run deletes it again (planted through the
    proxy when the pruner's DELETE passes). Each time the tombstones stay, the merge is deleted as pruned, and no
    reader ever shows a pruned crash; the tombstones go only once no merge has come back for SETTLE."""
    server = objectstores.make("seaweedfs", tmp_path)
    server.start()
    try:
        url = server.url("fleet")
        day, pruned, merged = a_day_to_prune(server, tmp_path)
        bucket = Bucket(server)
        rows = gzip.decompress(bucket.get(merged)).splitlines()
        env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        reader = tmp_path / "reader.toml"
        reader.write_text(f'store = "{tmp_path / "no-store"}"\n')

        def compaction_of(replaced: str) -> tuple:
            """(key, bytes) of node-a's merge of ``replaced``, holding the pruned crashes' rows as they were."""
            head = json.dumps(fleet_index.replaces([replaced.rsplit("/", 1)[1]])).encode()
            key = fleet_index.object_key("fleet", "node-a", day, time.time())
            return key, gzip.compress(b"\n".join([head] + [r for r in rows if b'"replaces"' not in r]) + b"\n")

        def no_pruned_crash_is_live() -> None:
            listed = json.loads(corepipe(reader, env, "list", "--remote", url, "--json").stdout)
            assert [i["id"] for i in listed if i["id"] in pruned] == []
            assert len(listed) == 1
            query = "SELECT count(*) AS n FROM crashes"
            assert corepipe(reader, env, "fleet", "query", "--remote", url, query).stdout.splitlines() == ["n", "1"]

        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2").stdout
        assert "deleted 1 index objects whose crashes are all pruned" in out, out
        assert partition_keys(bucket, "fleet", "node-a", day) == []
        tombstones = partition_keys(bucket, "fleet", fleet_index.PRUNER, day)
        assert len(tombstones) == 1
        # (1) The merge lands after that run's check, which started the day's clock.
        late, data = compaction_of(merged)
        bucket.put(late, data)
        no_pruned_crash_is_live()
        settle(tmp_path / "cache")
        # (2) A second merge, of the first, lands while the next run deletes the first.
        later = {}

        def plant(method: str, path: str):  # noqa: ANN202
            if method == "DELETE" and unquote(path.split("?")[0]).endswith(late) and not later:
                later.update([compaction_of(late)])
                bucket.put(*next(iter(later.items())))
            return None

        proxy = objectstores.CountingProxy(server.port, fault=plant)
        try:
            proxied = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
            out = corepipe(reader, proxied, "prune", "--remote", url, "--max-age", "2").stdout
        finally:
            proxy.close()
        assert later and "deleted 1 index objects whose crashes are all pruned" in out, out
        assert "tombstone" not in out  # the first merge restarted the day's clock
        assert partition_keys(bucket, "fleet", fleet_index.PRUNER, day) == tombstones
        assert partition_keys(bucket, "fleet", "node-a", day) == list(later)
        no_pruned_crash_is_live()
        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2").stdout
        assert out.splitlines() == ["deleted 1 index objects whose crashes are all pruned"], out
        no_pruned_crash_is_live()
        # An index object that cannot be read whole may hold any rows: no day's tombstones go while it is there.
        cut = fleet_index.object_key("fleet", "node-b", day, time.time())
        bucket.put(cut, data[:len(data) // 2])
        settle(tmp_path / "cache")
        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2").stdout
        assert out.splitlines() == [f"tombstones kept: 1 index objects could not be read ({cut}, ...)",
                                    f"nothing under {url} to prune"], out
        assert partition_keys(bucket, "fleet", fleet_index.PRUNER, day) == tombstones
        bucket.delete(cut)
        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2").stdout
        assert out.strip() == f"nothing under {url} to prune"  # the day's clock starts again
        settle(tmp_path / "cache")
        out = corepipe(reader, env, "prune", "--remote", url, "--max-age", "2").stdout
        assert out.splitlines() == ["deleted 1 tombstone objects that hide no crash any more"], out
        assert index_keys(bucket, day) == []
        no_pruned_crash_is_live()
    finally:
        server.stop()


def test_a_compaction_slower_than_its_limit_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction whose reads take longer than fleet_compact.LIMIT (1 s here; a proxy makes each GET of an index
    object slow) writes no merged object, so it cannot bring back rows the pruner removed meanwhile: the two objects
    stay, and a compaction within the limit merges them."""
    from corepipe.domain import fleet, fleet_compact
    from corepipe.platform.objectstore import DestinationError, open_destination

    server = objectstores.make("seaweedfs", tmp_path)
    server.start()
    try:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        store, _config, when, day = past_node(server, tmp_path, 2)
        destination = open_destination(server.url("fleet"))
        for n in range(2):
            path, rec = objectstores.stored_crash(store, 16, when=when + n)
            relative = ("host", path.name)
            objects = {fleet.crash_key("fleet", "node-a", relative, "record.json"): 100}
            fleet.write_rows(destination, "node-a", [fleet_index.row(rec, "node-a", "fleet", relative, objects)])
        bucket = Bucket(server)
        two = partition_keys(bucket, "fleet", "node-a", day)
        assert len(two) == 2

        def slow(method: str, path: str):  # noqa: ANN202
            if method == "GET" and "list-type" not in path and "_index" in unquote(path):
                time.sleep(0.7)
            return None

        monkeypatch.setattr(fleet_compact, "LIMIT", 1)
        proxy = objectstores.CountingProxy(server.port, fault=slow)
        try:
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
            with pytest.raises(DestinationError, match="took more than 1 s; nothing merged"):
                fleet_compact.compact(open_destination(server.url("fleet")), "node-a", day, print)
        finally:
            proxy.close()
        assert partition_keys(bucket, "fleet", "node-a", day) == two
        merged = fleet_compact.compact(destination, "node-a", day, print)
        assert partition_keys(bucket, "fleet", "node-a", day) == [merged]
    finally:
        server.stop()
