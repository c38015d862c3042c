"""``list --remote`` runs its filters and its grouping as SQL over the cached index (domain/fleet_sql.py): the
same answers as the local ``list`` (list_cmd.matches, list_cmd.with_signature, signature.groups) give on the same
crashes. Records are built by the collector's own record builder, rows by the shipper's row builder. A failed
build of the cached database leaves no file behind."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest

from corepipe.commands import list_cmd
from corepipe.domain import catalog, fleet_index, record, signature
from corepipe.domain.containers import Container
from corepipe.platform.kernel import KernelArgs

duckdb = pytest.importorskip("duckdb", reason="needs the 'fleet' extra (duckdb)")
from corepipe.domain import fleet_sql  # noqa: E402 - after the extra is known to be there

CONTAINERS = [
    Container(runtime="host"),
    Container(runtime="docker", id="a" * 64, name="web", image="registry:5000/team/web:1.2"),
    Container(runtime="containerd", id="b" * 64, name="api", image="api@sha256:" + "c" * 64, pod_name="api-0",
              pod_namespace="prod", pod_uid="u-1", confidence="certain"),
    Container(runtime="cri-o", id="d" * 64, name="api", image="api:2", pod_name="api-1", pod_namespace="dev"),
]
#: Signatures: two sites with one backtrace signature each, one site with two, and crashes without one.
SIGNATURES = [
    {"hash": "1111aaaa00000000", "text": "app SIGSEGV: f | g | main", "source": "backtrace", "site": "s1"},
    {"hash": "2222bbbb00000000", "text": "app SIGSEGV: at app+0x10", "source": "crash site", "site": "s1"},
    {"hash": "3333cccc00000000", "text": "app SIGABRT: h | main", "source": "backtrace", "site": "s2"},
    {"hash": "4444dddd00000000", "text": "app SIGABRT: k | main", "source": "backtrace", "site": "s2"},
    {"hash": "5555eeee00000000", "text": "app SIGABRT: at app+0x20", "source": "crash site", "site": "s2"},
    None,
]


def fleet_rows() -> list:
    rows = []
    combos = itertools.product(range(3), CONTAINERS, SIGNATURES, (11, 6))
    for number, (node, container, sig, signal) in enumerate(combos):
        crash = f"{number:012x}"
        when = 1796600000 + number * 7
        rec = record.build(crash_id=crash, args=KernelArgs(pid=100 + number, signal=signal, time=when, uid=1000,
                                                           comm=f"app{number % 4}"),
                           snapshot=None, container=container, redact_env=[], received=when + 0.5)
        rec.update(status="complete", exe=f"/usr/bin/app{number % 3}",
                   signature={**sig, "algorithm": signature.ALGORITHM, "version": 1} if sig else None)
        relative = ("host", f"20261207T000000Z-{crash}")
        key = f"fleet/node-{node}/host/20261207T000000Z-{crash}/record.json"
        rows.append(fleet_index.check(json.loads(json.dumps(fleet_index.row(rec, f"node-{node}", "fleet", relative,
                                                                            {key: 2000}))),
                                      "fleet", f"node-{node}"))
    return rows


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    directory = tmp_path_factory.mktemp("cache")
    rows = fleet_rows()
    objects = {}
    for node in range(3):
        name = f"{node:032x}.ndjson"
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows if r["node"] == f"node-{node}"))
        objects[f"fleet/_index/v1/dt=2026-12-07/node=node-{node}/x-{node}.ndjson.gz"] = {"file": name}
    return rows, fleet_sql.connect(str(directory), objects, print)


FILTERS = [{}, {"node": "node-1"}, {"container": "api"}, {"container": "aaaa"}, {"pod": "api-0"},
           {"namespace": "dev"}, {"image": "registry:5000/team/web"}, {"image": "api"}, {"image": "api:2"},
           {"since": 1796600000 + 700, "until": 1796600000 + 1400}, {"signal": "SIGSEGV"}, {"signal": 6},
           {"signal": "SIGABRT"}, {"exe": "app1"}, {"exe": "/usr/bin/app2"}, {"exe": "app3"},
           {"signature": "1111"}, {"signature": "2222"}, {"signature": "3333cccc00000000"},
           {"signature": "app SIGSEGV: f | g | main"}, {"signature": "-"}, {"signature": ""},
           {"node": "node-2", "signal": 11, "namespace": "prod"}]
NAMES = ("node", "container", "pod", "namespace", "job", "task", "image", "since", "until", "signal", "exe",
         "signature")


def local(rows: list, filters: dict, last: object = None) -> list:
    """What the local ``list`` keeps of the same rows (list_cmd.run's order of steps)."""
    ns = argparse.Namespace(**{name: filters.get(name) for name in NAMES})
    items = sorted([("p", r) for r in rows], key=catalog.sort_key)
    if ns.signature is not None:
        items = list_cmd.with_signature(items, ns.signature)
    items = [(p, r) for p, r in items if list_cmd.matches(r, ns) and ns.node in (None, r["node"])]
    return items[-last:] if last else items


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "all")
def test_sql_filters_keep_what_the_local_filters_keep(table: tuple, filters: dict) -> None:
    rows, con = table
    expected = [(r["node"], r["id"]) for _p, r in local(rows, filters)]
    got = [(r["node"], r["id"]) for r in fleet_sql.crashes_matching(con, filters)]
    assert got == expected
    # Only these keep nothing: an empty signature, and a crash-site hash that its backtrace signature took in.
    assert bool(got) != (filters in ({"signature": ""}, {"signature": "2222"})), "proves little"


@pytest.mark.parametrize("filters", [{}, {"node": None, "exe": None}, {"since": 0}, {"node": "node-0"},
                                     {"signal": "SIGABRT"}, {"container": "api"}],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "all")
def test_sql_groups_are_the_local_groups(table: tuple, filters: dict) -> None:
    """Without filters (none given, or all None: list_cmd's) from the table built with the database
    (``crash_groups``), with a filter that keeps every crash (since 0) computed: the same groups."""
    rows, con = table
    expected = signature.groups(local(rows, filters))
    for group in expected:
        group.update(containers=sorted(group["containers"]), images=sorted(group["images"]),
                     nodes=sorted(group["nodes"]))
    assert fleet_sql.groups(con, filters) == expected
    # The crash-site signature of s1 joins its one backtrace signature; s2 has two, so its crash site stays apart.
    hashes = {g["hash"] for g in expected}
    assert "2222bbbb00000000" not in hashes and ("5555eeee00000000" in hashes or filters)


def test_last_n_and_the_table_keeps_one_row_per_crash(table: tuple, tmp_path: Path) -> None:
    rows, con = table
    assert [r["id"] for r in fleet_sql.crashes_matching(con, {"node": "node-2"}, 5)] == \
        [r["id"] for _p, r in local(rows, {"node": "node-2"}, 5)]
    # A crash in two objects (the first by key wins) and a tombstoned one.
    first, second = rows[0], rows[1]
    (tmp_path / "a.ndjson").write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    (tmp_path / "b.ndjson").write_text(json.dumps({**first, "comm": "again"}) + "\n" + json.dumps(
        {"v": 1, "kind": "tombstone", "id": second["id"], "node": second["node"], "deleted": 1.0}) + "\n")
    warnings: list = []
    objects = {"k/1": {"file": "a.ndjson"}, "k/2": {"file": "b.ndjson"}}
    con = fleet_sql.connect(str(tmp_path), objects, warnings.append)
    assert fleet_sql.query(con, "SELECT id, comm FROM crashes") == (["id", "comm"], [(first["id"], first["comm"])])
    assert warnings == [f"crash {first['node']}/{first['id']} is in the index 2 times; the row of k/1 is used"]
    # Kept in the cache: the same index opens the same database, without reading the rows again.
    con.close()
    (tmp_path / "a.ndjson").unlink()
    con = fleet_sql.connect(str(tmp_path), objects, warnings.append)
    assert fleet_sql.query(con, "SELECT count(*) FROM crashes")[1] == [(1,)] and len(warnings) == 1
    with pytest.raises(fleet_sql.QueryError, match="disabled"):
        fleet_sql.query(con, f"SELECT * FROM read_json('{tmp_path}/a.ndjson')")


def test_a_database_that_fails_to_build_leaves_no_file_in_the_cache(tmp_path: Path) -> None:
    """DuckDB writes the cached database itself, under a temporary name renamed when complete (fs.replace cannot
    hand DuckDB a path): when the build fails (here a cached rows file is gone), that file and its WAL go too."""
    (tmp_path / "a.ndjson").write_text(json.dumps(fleet_rows()[0]) + "\n")
    objects = {"k/1": {"file": "a.ndjson"}, "k/2": {"file": "gone.ndjson"}}
    with pytest.raises(fleet_sql.QueryError, match="cannot be used"):
        fleet_sql.connect(str(tmp_path), objects, print)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ndjson"]
