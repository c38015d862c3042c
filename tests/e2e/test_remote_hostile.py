"""One compromised fleet node against ``--remote`` (issue 30 item 4; docs/hardening.md): a real server on loopback
(SeaweedFS for S3, Azurite for Azure) holds a hostile node's objects, written with the vendor's SDK as that node's
credentials could, and the workstation's commands stay bounded and give one line each."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
from pathlib import Path

import objectstores
import pytest
import zstandard
from objectstores import corepipe
from support import mounted_tmpfs, need_tool

from corepipe.domain import binaries, fleet

KINDS = ["seaweedfs", "azure"]


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path: Path):
    yield from objectstores.running(request.param, tmp_path)


def shipped(server: objectstores.Server, tmp_path: Path, node: str, **crash: object) -> tuple:
    """(config, crash record, its index row) of one crash ``node`` shipped to the ``fleet`` prefix."""
    store = tmp_path / node
    _path, rec = objectstores.stored_crash(store, 4096, **crash)  # type: ignore[arg-type]
    config = tmp_path / f"{node}.toml"
    config.write_text(f'store = "{store}"\nship_node = "{node}"\nship_to = "{server.url("fleet")}"\n')
    corepipe(config, server.env, "ship", "--once")
    rows = [json.loads(line) for key in server.listing("fleet/_index/v1/") if f"/node={node}/" in key
            for line in gzip.decompress(server.read(key)).splitlines()]
    return config, rec, next(row for row in rows if row["id"] == rec["id"])


def rewrite_row(server: objectstores.Server, row: dict) -> None:
    """The node's index partition replaced by one object holding ``row`` (as the hostile node may)."""
    for key in server.listing("fleet/_index/v1/"):
        if f"/node={row['node']}/" in key:
            server.delete(key)
    server.put(f"fleet/_index/v1/dt={row['time'][:10]}/node={row['node']}/20260101T000000.000000Z-e1.ndjson.gz",
               gzip.compress(json.dumps(row).encode() + b"\n"))


def bomb(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes: a few KiB for a GiB."""
    compressor = zstandard.ZstdCompressor(level=19).compressobj()
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(size >> 20)) + compressor.flush()


def test_a_small_core_that_inflates_past_its_record_stops_there(server, tmp_path: Path) -> None:
    """A 1 GiB bomb (tens of KiB stored) behind a record that claims 4096 bytes: extract -o and debug stop one
    chunk past 4096 bytes, on a 64 MiB filesystem that the bomb would fill, and write nothing complete."""
    need_tool("gdb")
    config, rec, row = shipped(server, tmp_path, "evil")
    data = bomb(1 << 30)
    assert len(data) < 64 << 10
    server.put(row["keys"]["core"]["key"], data)
    rewrite_row(server, {**row, "keys": {**row["keys"], "core": {**row["keys"]["core"], "size": len(data)}}})
    with mounted_tmpfs(tmp_path / "small", "64m") as small:
        env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(small)}
        wanted = "is larger than the 4096 bytes its record claims"
        out = small / "core"
        extract = corepipe(config, env, "extract", "--remote", server.url("fleet"), f"evil/{rec['id']}", "-o",
                           str(out), check=False)
        assert extract.returncode == 1 and wanted in extract.stderr, extract.stderr
        assert len(extract.stderr.splitlines()) == 1 and not out.exists() and not os.listdir(small)
        debug = corepipe(config, env, "debug", "--remote", server.url("fleet"), f"evil/{rec['id']}", "--", "-batch",
                         check=False)
        assert debug.returncode == 1 and wanted in debug.stderr, debug.stderr
        assert len(debug.stderr.splitlines()) == 1 and not os.listdir(small)


def test_junk_planted_under_a_binarys_name_is_replaced_not_trusted(server, tmp_path: Path) -> None:
    """A hostile node puts junk of the right size, with the real sha256 as metadata, where a real node's binary
    goes: the real node judges it by the checksum the store computed, and uploads its binary over it."""
    real = secrets.token_bytes(64 << 10)
    entry = {"build_id": "b1d" * 8, "sha256": hashlib.sha256(real).hexdigest()}
    key = fleet.binary_key("fleet", binaries.stored_name(entry))
    server.put(key, secrets.token_bytes(len(real)), {"sha256": entry["sha256"]})
    shipped(server, tmp_path, "node-a", binary=real)
    assert server.read(key) == real


def test_a_binary_in_parts_is_not_sent_again(server, tmp_path: Path) -> None:
    """A 9 MiB binary (uploaded in parts) that one node shipped: the next node finds it by the store's composite
    CRC32 and sends no byte of it (S3). Azure computes no checksum of a blob committed from blocks, so there the
    next node uploads it again (docs/shipping.md)."""
    real = secrets.token_bytes(9 << 20)
    shipped(server, tmp_path, "node-a", binary=real)
    store = tmp_path / "node-b"
    objectstores.stored_crash(store, 4096, binary=real)
    config = tmp_path / "b.toml"
    config.write_text(f'store = "{store}"\nship_node = "node-b"\n')
    proxy = objectstores.CountingProxy(server.port)
    try:
        env = server.env
        if isinstance(server, objectstores.Azurite):
            env = {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string().replace(
                f"127.0.0.1:{server.port}", f"127.0.0.1:{proxy.port}")}
        else:
            env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        corepipe(config, env, "ship", "--once", "--to", server.url("fleet"))
    finally:
        proxy.close()
    # The core, the record and the index object; on Azure also the binary's two blocks and their commit.
    assert proxy.counts.get("PUT") == (3 if isinstance(server, objectstores.SeaweedS3) else 6), proxy.counts
    assert "POST" not in proxy.counts, proxy.counts
    key = [k for k in server.listing("fleet/.build-id/")][0]
    assert server.read(key) == real


def test_a_record_with_wrong_types_gives_one_line(server, tmp_path: Path) -> None:
    need_tool("gdb")
    config, rec, row = shipped(server, tmp_path, "evil")
    hostile = {**rec, "core": {**rec["core"], "size": "4096", "file": 7}, "signal": "SEGV", "exe": ["x"],
               "container": [1], "binaries": {"files": "junk"}, "time": 5, "uid": "root"}
    data = json.dumps(hostile).encode()
    server.put(row["keys"]["record"]["key"], data)
    rewrite_row(server, {**row, "keys": {**row["keys"], "record": {**row["keys"]["record"], "size": len(data)}}})
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    for command in (["info"], ["info", "--json"], ["extract", "-o", str(tmp_path / "out")], ["debug"]):
        extra = ["--", "-batch"] if command == ["debug"] else []
        proc = corepipe(config, env, command[0], "--remote", server.url("fleet"), f"evil/{rec['id']}",
                        *command[1:], *extra, check=False)
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 1, (command, proc.stderr)
        assert proc.returncode in (0, 1), (command, proc.returncode, proc.stderr)


def test_a_core_claimed_over_remote_core_max_is_refused_before_any_download(server, tmp_path: Path) -> None:
    """A record claiming a 1 TiB core against ``remote_core_max`` 1 MiB: extract -o and debug refuse in one line
    that says how to raise the cap, before any download (the core object is gone, so a download would fail
    differently), whatever free space there is."""
    config, rec, row = shipped(server, tmp_path, "evil")
    hostile = json.dumps({**rec, "core": {**rec["core"], "size": 1 << 40}}).encode()
    server.put(row["keys"]["record"]["key"], hostile)
    server.delete(row["keys"]["core"]["key"])
    rewrite_row(server, {**row, "keys": {**row["keys"], "record": {**row["keys"]["record"], "size": len(hostile)}}})
    config.write_text(config.read_text() + "remote_core_max = 1048576\n")
    env = {**server.env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    for command in (["extract", "-o", str(tmp_path / "out")], ["debug", "--", "-batch"]):
        proc = corepipe(config, env, command[0], "--remote", server.url("fleet"), f"evil/{rec['id']}", *command[1:],
                        check=False)
        assert proc.returncode == 1 and "over remote_core_max = 1048576; nothing downloaded" in proc.stderr, proc.stderr
        assert f"raise remote_core_max in {config}" in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if "corepipe-remote" in p]
