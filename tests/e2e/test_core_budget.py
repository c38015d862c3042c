"""The fleet-wide core budget per signature (docs/shipping.md, "Core budget") against real servers on loopback,
SeaweedFS for S3 and Azurite for Azure: nodes shipping crashes of one signature at the same moment claim exactly
``ship_signature_cores`` markers with a conditional create; the others ship the record only, their core kept on
the node, and the index says so. What the servers hold is read with the vendors' SDKs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import objectstores
import pytest

from corepipe.platform.objectstore import open_destination

KINDS = ["seaweedfs", "azure"]
SIGNATURE = {"hash": "5eed5eed5eed5eed", "text": "f;g;main", "algorithm": "frames", "version": 1,
             "source": "backtrace", "site": None}
NODES = 6
BUDGET = 2


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path: Path):
    yield from objectstores.running(request.param, tmp_path)


def test_a_conditional_create_has_exactly_one_winner(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store itself decides: 16 writers at once creating one key, through corepipe's adapter."""
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    destination = open_destination(server.url("fleet"))
    wins, failures = [], []
    start = threading.Barrier(16)

    def create(number: int) -> None:
        start.wait()
        try:
            if destination.create("fleet/_budget/v1/race/1", json.dumps({"writer": number}).encode(), {}):
                wins.append(number)
        except Exception as exc:  # noqa: BLE001 - reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(wins) == 1, (failures, wins)
    assert json.loads(server.read("fleet/_budget/v1/race/1")) == {"writer": wins[0]}


def test_racing_nodes_ship_exactly_the_budget_of_cores(server, tmp_path: Path) -> None:
    url = server.url("fleet")
    stores = {}
    for number in range(NODES):
        node = f"node-{number}"
        path, rec = objectstores.stored_crash(tmp_path / node, 4096 if number % 2 else 9 << 20, signature=SIGNATURE)
        config = tmp_path / f"{node}.toml"
        config.write_text(f'store = "{tmp_path / node}"\nship_node = "{node}"\nship_signature_cores = {BUDGET}\n'
                          "delete_after_ship = true\n")
        stores[node] = (path, rec, config)
    # Every shipper at once (each its own process, as on the nodes).
    procs = {node: subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(config), "ship", "--once",
                                     "--to", url], env={**os.environ, **server.env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node, (_path, _rec, config) in stores.items()}
    outcome = {node: (proc.wait(timeout=300), proc.stdout.read(), proc.stderr.read()) for node, proc in procs.items()}
    for node, (code, out, err) in outcome.items():
        assert code == 0 and f"shipped {stores[node][1]['id']}" in out, (node, err)
    held = server.listing(f"fleet/_budget/v1/{SIGNATURE['hash']}/")
    assert sorted(held) == [f"fleet/_budget/v1/{SIGNATURE['hash']}/{n}" for n in range(1, BUDGET + 1)]
    winners = {json.loads(server.read(key))["node"] for key in held}
    listing = server.listing("fleet/")
    cores = {key.split("/")[1] for key in listing if key.endswith("/core.zst")}
    records = {key.split("/")[1] for key in listing if key.endswith("/record.json")}
    assert cores == winners and records == set(stores), (cores, winners, records)
    for node, (path, _rec, _config) in stores.items():
        withheld = "record only, its core kept on this node" in outcome[node][2]
        assert withheld == (node not in winners), outcome[node][2]
        # delete_after_ship: a shipped core's crash is gone here; a withheld one keeps its core under local policy.
        assert path.exists() == withheld and (not withheld or (path / "core.zst").exists())
    rows = [json.loads(line) for key in listing if "/_index/v1/" in key
            for line in gzip.decompress(server.read(key)).splitlines()]
    states = {row["node"]: (row["core_state"], row["keys"]["core"]) for row in rows}
    assert {node for node, (state, _core) in states.items() if state == "present"} == winners
    assert all(state == "withheld" and core is None for node, (state, core) in states.items() if node not in winners)
    # A second sweep of a withheld crash changes nothing and claims nothing.
    loser = sorted(set(stores) - winners)[0]
    again = objectstores.corepipe(stores[loser][2], server.env, "ship", "--once", "--to", url)
    assert again.stdout == "" and server.listing(f"fleet/_budget/v1/{SIGNATURE['hash']}/") == held


def test_a_store_that_refuses_conditional_writes_still_gets_the_core(tmp_path: Path) -> None:
    """The budget saves bandwidth; it never stops shipping: a store answering 501 to the marker's conditional
    create (a loopback proxy in front of SeaweedFS, which itself honours it) gets the core, with one warning."""
    server = objectstores.make("seaweedfs", tmp_path)
    server.start()
    proxy = objectstores.CountingProxy(server.port, fault=lambda m, p: 501 if m == "PUT" and "/_budget/" in p else None)
    try:
        _path, rec = objectstores.stored_crash(tmp_path / "store", 4096, signature=SIGNATURE)
        config = tmp_path / "c.toml"
        config.write_text(f'store = "{tmp_path / "store"}"\nship_node = "node-a"\n')
        env = {**server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        shipped = objectstores.corepipe(config, env, "ship", "--once", "--to", server.url("fleet"))
    finally:
        proxy.close()
        held = server.listing("fleet/")
        server.stop()
    assert f"shipped {rec['id']}" in shipped.stdout
    assert len(shipped.stderr.splitlines()) == 1 and "core budget not applied" in shipped.stderr, shipped.stderr
    assert any(key.endswith("/core.zst") for key in held) and not any("/_budget/" in key for key in held), held
