"""``corepipe ship`` and the fleet view against real object-store servers on loopback (tests/objectstores.py):
Azurite for Azure Blob Storage, SeaweedFS for S3 (it checks SigV4, Content-MD5 and part CRC32s, and keeps
multipart uploads across a SIGKILL, where moto checked neither checksum and forgot everything on a restart; no
test here needs moto any more). Every test runs against both; what the servers hold is read with the vendors'
SDKs (azure-storage-blob, boto3), never through corepipe's own adapter."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import objectstores
import pytest
import zstandard
from objectstores import corepipe
from runtimes import unique
from support import (
    CRASH_LINE,
    NO_RATE_LIMIT,
    crash,
    dmesg_lines,
    installed_handler,
    mounted_tmpfs,
    need,
    need_tool,
    wait_for,
)

from corepipe.platform import digest
from corepipe.platform.store import CORE, PARTIAL_CORE, RECORD, SHIP_LOCK, SHIP_PROGRESS, SHIP_STATUS, SHIPPED

KINDS = ["azure", "seaweedfs"]
GIB = 1 << 30


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, tmp_path: Path):
    yield from objectstores.running(request.param, tmp_path)


def config(path: Path, store: Path, extra: str = "") -> Path:
    path.write_text(f'store = "{store}"\nship_node = "node-a"\n{extra}')
    return path


def objects(server: objectstores.Server, prefix: str) -> dict:
    """key -> size of what the server holds under ``prefix``, read with the vendor's SDK."""
    return server.listing(prefix + "/")


def test_ship_verify_dedup_delete_and_debug_remotely(server, handler_dir: Path, crasher: Path,
                                                    tmp_path: Path) -> None:
    need_tool("gdb")
    url = server.url("fleet")
    extra = f'binaries_host = true\nship_to = "{url}"\nship_node = "node-a"\n{NO_RATE_LIMIT}'
    with installed_handler(handler_dir, config_extra=extra) as handler:
        crash([str(crasher), "0", "ship-one"])
        first = handler.wait_record(lambda r: r["comm"] == "ship-one")
    exe = next(e for e in first["binaries"]["files"] if e["exe"])
    assert exe["stored"], first["binaries"]

    shipped = corepipe(handler.config, server.env, "ship", "--once")
    assert f"shipped {first['id']}" in shipped.stdout
    marker = json.loads((Path(first["_dir"]) / SHIPPED).read_text())
    assert marker["destination"] == url and marker["node"] == "node-a"
    held = objects(server, "fleet")
    relative = Path(first["_dir"]).relative_to(handler.store)
    core_key = f"fleet/node-a/{relative}/{CORE}"
    assert server.read(core_key) == (Path(first["_dir"]) / CORE).read_bytes()
    assert server.read(f"fleet/node-a/{relative}/{RECORD}") == (Path(first["_dir"]) / RECORD).read_bytes()
    binaries = {k: v for k, v in held.items() if k.startswith("fleet/.build-id/")}
    assert len(binaries) == 1 and next(iter(binaries.values())) == exe["size"]
    assert (Path(first["_dir"]) / CORE).exists(), "deleted although delete_after_ship is off"

    # A second crash of the same program: its binary is already in the fleet's area and is not sent again.
    with installed_handler(handler_dir, config_extra=extra + "delete_after_ship = true\n") as handler:
        crash([str(crasher), "0", "ship-two"])
        second = handler.wait_record(lambda r: r["comm"] == "ship-two")
    shipped = corepipe(handler.config, server.env, "ship", "--once")
    assert shipped.stdout.split() == ["shipped", first["id"], "shipped", second["id"]] or \
        shipped.stdout.split() == ["shipped", second["id"]], shipped.stdout
    after = objects(server, "fleet")
    assert {k: v for k, v in after.items() if k.startswith("fleet/.build-id/")} == binaries
    # Verified, then deleted locally (both: the first was shipped before delete_after_ship was turned on).
    assert not Path(first["_dir"]).exists() and not Path(second["_dir"]).exists()

    # The fleet view, from the objects alone (the local crashes are gone).
    listed = json.loads(corepipe(handler.config, server.env, "list", "--remote", url, "--json").stdout)
    assert [(item["id"], item["node"], item["core_state"]) for item in listed] == [
        (first["id"], "node-a", "present"), (second["id"], "node-a", "present")]
    assert listed[0]["path"] == f"{url}/node-a/{relative}"
    assert corepipe(handler.config, server.env, "list", "--remote", url, "--node", "node-b", "--json").stdout \
        .strip() == "[]"
    only = json.loads(corepipe(handler.config, server.env, "list", "--remote", url, "--exe", "ship-two",
                               "--json").stdout)
    assert [item["id"] for item in only] == [second["id"]]
    table = corepipe(handler.config, server.env, "list", "--remote", url).stdout
    assert first["id"] in table and second["id"] in table

    info = corepipe(handler.config, server.env, "info", "--remote", url, first["id"][:6]).stdout
    assert f"directory:           {url}/node-a/{relative}" in info and f"crasher.c:{CRASH_LINE}" in info, info

    out = tmp_path / "core"
    corepipe(handler.config, server.env, "extract", "--remote", url, second["id"], "-o", str(out))
    assert file_digest(out, second["core"])

    shutil.rmtree(handler.store / ".build-id")  # nothing local to fall back on
    temp = handler_dir / "tmp"  # this test's own, reachable by the debugger's uid
    temp.mkdir()
    debug = corepipe(handler.config, {**server.env, "TMPDIR": str(temp)}, "debug", "--remote", url, second["id"],
                     "--", "-batch", "-ex", "bt", "-ex", f"shell readlink $COREPIPE_SYSROOT{exe['path']}")
    text = debug.stdout + debug.stderr
    assert " main " in text and f"crasher.c:{CRASH_LINE}" in text, text
    # gdb's executable is the one downloaded from the store, linked from debug's temporary sysroot: as root, a copy
    # of the download given to gdb's one-off uid (the download is root's alone).
    assert re.search(r"/corepipe-debug-[^/]+/files/[0-9]+\n", text), text
    assert not list(temp.glob("corepipe-remote-*")), "the downloads were left behind"


def file_digest(path: Path, core: dict) -> bool:
    """Whether the file's bytes have the digest the record states (core.digest, or sha256 in old records)."""
    algorithm, value = digest.stated(core)
    hasher = digest.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest() == value


def parts_done(crash: Path) -> int:
    """How many parts of the crash's core ship-progress.json says are uploaded."""
    try:
        progress = json.loads((crash / SHIP_PROGRESS).read_text())
    except (OSError, ValueError):
        return 0
    entry = next((v for v in progress.values() if isinstance(v, dict) and v.get("key", "").endswith(CORE)), {})
    return len(entry.get("parts") or entry.get("blocks") or {})


def test_kill_9_mid_upload_then_resume(server, tmp_path: Path) -> None:
    store = tmp_path / "store"
    path, rec = objectstores.stored_crash(store, GIB)
    # A bandwidth cap keeps the upload going long enough to be killed in the middle of it.
    slow = config(tmp_path / "slow.toml", store, "ship_bandwidth = 67108864\ndelete_after_ship = true\n")
    url = server.url("resume")
    shipper = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(slow), "ship", "--once", "--to",
                                url], env={**os.environ, **server.env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: parts_done(path) >= 3, 120, "three parts uploaded")
    finally:
        os.kill(shipper.pid, signal.SIGKILL)
        shipper.wait()
    assert parts_done(path) < 128, "the upload finished before it was killed"
    # Nothing that looks complete: no core object, no record object, nothing in the fleet view.
    held = objects(server, "resume")
    assert not any(key.endswith((CORE, RECORD)) for key in held), held
    fast = config(tmp_path / "fast.toml", store, "delete_after_ship = true\n")
    assert json.loads(corepipe(fast, server.env, "list", "--remote", url, "--json").stdout) == []
    assert (path / CORE).exists() and not (path / SHIPPED).exists()

    resumed = corepipe(fast, server.env, "ship", "--once", "--to", url)
    assert f"shipped {rec['id']}" in resumed.stdout
    assert "parts already uploaded" in resumed.stderr, resumed.stderr
    reused = int(resumed.stderr.split("resuming ")[1].split(": ")[1].split()[0])
    assert reused >= 3, resumed.stderr
    assert not path.exists(), "not deleted after the verified upload"
    held = objects(server, "resume")
    core_key = next(key for key in held if key.endswith(CORE))
    assert held[core_key] == rec["core"]["compressed_size"]
    out = tmp_path / "core"
    corepipe(fast, server.env, "extract", "--remote", url, rec["id"], "-o", str(out))
    assert out.stat().st_size == GIB
    assert file_digest(out, rec["core"])


def _status(store: Path) -> dict:
    try:
        return json.loads((store / SHIP_STATUS).read_text())
    except (OSError, ValueError):
        return {}


def test_server_down_then_back(server, tmp_path: Path) -> None:
    """The resident shipper: retries while the server is down, ships once it is back, then wakes up for a
    crash filed later (inotify: well before its 60 s poll)."""
    store = tmp_path / "store"
    path, rec = objectstores.stored_crash(store, 20 << 20, comm="early")
    cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("down")}"\nship_retry_max = 1\n'
                                             "delete_after_ship = true\n")
    server.stop()
    shipper = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(cfg), "ship"],
                               env={**os.environ, **server.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        failed = wait_for(lambda: _status(store).get("ok") is False and _status(store), 120, "a failed sweep")
        assert rec["id"] in failed["last_error"]["message"]
        assert (path / CORE).exists() and not (path / SHIPPED).exists()
        server.start()
        wait_for(lambda: not path.exists(), 120, "the crash shipped and deleted after the server came back")
        assert json.loads(corepipe(cfg, server.env, "list", "--remote", server.url("down"), "--json").stdout)[0][
            "id"] == rec["id"]
        later, late = objectstores.stored_crash(store, 1 << 20, comm="late")
        wait_for(lambda: not later.exists(), 30, "the later crash shipped on its inotify event")
        ids = [i["id"] for i in json.loads(corepipe(cfg, server.env, "list", "--remote", server.url("down"),
                                                    "--json").stdout)]
        assert ids == [rec["id"], late["id"]]
    finally:
        os.kill(shipper.pid, signal.SIGTERM)
        shipper.wait()


def _ship_metrics(cfg: Path) -> dict:
    """The corepipe_ship_* samples of ``corepipe metrics``, parsed with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = corepipe(cfg, {}, "metrics").stdout
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("corepipe_ship_")}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_credentials(kind: str, tmp_path: Path) -> None:
    """One clear line in the output, the log and status; nothing deleted; shipped once the credentials are fixed."""
    need(os.geteuid() == 0, "needs root: the shipper's errors go to the kernel log only as root")
    server = objectstores.make(kind, tmp_path)
    server.start()
    try:
        store = tmp_path / "store"
        path, rec = objectstores.stored_crash(store, 1 << 20, comm="creds")
        other, rec2 = objectstores.stored_crash(store, 1 << 20, comm="creds2")
        cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("creds")}"\ndelete_after_ship = true\n')
        denied = corepipe(cfg, server.bad_env(), "ship", "--once", check=False)
        assert denied.returncode == 1
        lines = denied.stderr.strip().splitlines()
        assert len(lines) == 1 and "access denied" in lines[0] and "check the" in lines[0], denied.stderr
        assert all((p / CORE).exists() and not (p / SHIPPED).exists() for p in (path, other))
        status = corepipe(cfg, {}, "status", check=False).stdout
        errors = [line for line in status.splitlines() if line.startswith("shipping: last error")]
        assert len(errors) == 1 and "access denied" in errors[0], status
        assert "2 crashes not shipped yet" in status, status
        failed_at = _status(store)["last_error"]["time"]
        backlog = _ship_metrics(cfg)
        assert backlog == {"corepipe_ship_backlog_crashes": 2, "corepipe_ship_last_sweep_ok": 0,
                           "corepipe_ship_backlog_bytes": rec["core"]["compressed_size"] +
                           rec2["core"]["compressed_size"], "corepipe_ship_last_error_timestamp_seconds": failed_at,
                           "corepipe_ship_last_sweep_timestamp_seconds": failed_at}, backlog
        # The sweep stops at the first crash refused (all would be): its line is in the kernel log.
        assert wait_for(lambda: [line for line in dmesg_lines("access denied")
                                 if rec["id"] in line or rec2["id"] in line], 10, "the error in the kernel log")
        fixed = corepipe(cfg, server.env, "ship", "--once")
        assert fixed.stdout.count("shipped ") == 2 and not path.exists()
        status = corepipe(cfg, {}, "status", check=False).stdout
        assert "0 crashes not shipped yet" in status and "last sweep" in status and " ok" in status, status
        backlog = _ship_metrics(cfg)
        assert backlog["corepipe_ship_backlog_crashes"] == 0 and backlog["corepipe_ship_backlog_bytes"] == 0
        assert backlog["corepipe_ship_last_sweep_ok"] == 1 and backlog["corepipe_ship_last_error_timestamp_seconds"] \
            == failed_at < backlog["corepipe_ship_last_sweep_timestamp_seconds"], backlog
    finally:
        server.stop()


def test_a_crash_still_being_collected_is_not_shipped_and_one_shipper_at_a_time(server, tmp_path: Path) -> None:
    store = tmp_path / "store"
    path, rec = objectstores.stored_crash(store, 1 << 20, comm="busy")
    (path / RECORD).write_text(json.dumps({**rec, "status": "collecting"}))
    cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("busy")}"\ndelete_after_ship = true\n')
    quiet = corepipe(cfg, server.env, "ship", "--once")
    assert quiet.stdout == "" and objects(server, "busy") == {}
    assert (path / CORE).exists() and not (path / SHIPPED).exists()
    (path / RECORD).write_text(json.dumps(rec))
    # One shipper per store: while another holds the store's ship lock, a sweep does nothing and says so.
    with open(store / SHIP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = corepipe(cfg, server.env, "ship", "--once", check=False)
    assert busy.returncode == 1 and "another 'corepipe ship' is sweeping" in busy.stderr and busy.stdout == ""
    assert f"shipped {rec['id']}" in corepipe(cfg, server.env, "ship", "--once").stdout


def test_full_local_disk_loses_nothing(server, tmp_path: Path) -> None:
    """The store's filesystem is full: the progress file cannot be written, so the sweep fails with one line,
    the crash stays and no object looks complete; with room again it ships."""
    with mounted_tmpfs(tmp_path / "disk", "40m") as disk:
        store = disk / "store"
        path, rec = objectstores.stored_crash(store, 20 << 20, comm="full")
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("full")}"\ndelete_after_ship = true\n')
        full = corepipe(cfg, server.env, "ship", "--once", check=False)
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
        assert f"corepipe ship: error: crash {rec['id']}: cannot ship from {path}: No space left on device" in \
            full.stderr.splitlines(), full.stderr
        assert (path / CORE).exists() and not (path / SHIPPED).exists()
        assert not any(key.endswith((CORE, RECORD)) for key in objects(server, "full"))
        filler.unlink()
        assert f"shipped {rec['id']}" in corepipe(cfg, server.env, "ship", "--once").stdout
        assert not path.exists()


def test_a_record_whose_core_the_policy_removed_still_ships(server, tmp_path: Path) -> None:
    store = tmp_path / "store"
    path, rec = objectstores.stored_crash(store, 1 << 20, comm="nocore")
    (path / CORE).unlink()  # as container_max_cores does: the record stays
    cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("nocore")}"\n')
    assert f"shipped {rec['id']}" in corepipe(cfg, server.env, "ship", "--once").stdout
    listed = json.loads(corepipe(cfg, server.env, "list", "--remote", server.url("nocore"), "--json").stdout)
    assert [(item["id"], item["core_state"]) for item in listed] == [(rec["id"], "none")]
    assert not any(key.endswith(CORE) for key in objects(server, "nocore"))


def test_the_core_is_checked_against_its_record_before_anything_is_committed(server, tmp_path: Path) -> None:
    """The record's digest, computed over the bytes read for the upload: a core that differs from its record is
    not committed remotely nor deleted locally; an old record (core.sha256, no core.digest) ships and extracts."""
    store = tmp_path / "store"
    damaged, rec = objectstores.stored_crash(store, 16 << 20, comm="damaged")
    with open(damaged / CORE, "r+b") as f:  # one byte in the middle, the size unchanged
        f.seek(8 << 20)
        byte = f.read(1)
        f.seek(8 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    old, old_rec = objectstores.stored_crash(store, 12 << 20, comm="old")
    with open(old / CORE, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    old_rec["core"].update(digest=None, sha256=hashlib.sha256(data).hexdigest())
    (old / RECORD).write_text(json.dumps(old_rec))
    cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("check")}"\ndelete_after_ship = true\n')
    result = corepipe(cfg, server.env, "ship", "--once", check=False)
    assert result.returncode == 1 and result.stdout.split() == ["shipped", old_rec["id"]], result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and rec["id"] in lines[0] and "not shipped, kept locally" in lines[0], result.stderr
    assert (damaged / CORE).exists() and not (damaged / SHIPPED).exists() and not old.exists()
    held = objects(server, "check")
    assert not any(rec["id"] in key for key in held), held
    listed = json.loads(corepipe(cfg, server.env, "list", "--remote", server.url("check"), "--json").stdout)
    assert [item["id"] for item in listed] == [old_rec["id"]]
    out = tmp_path / "core"
    extracted = corepipe(cfg, server.env, "extract", "--remote", server.url("check"), old_rec["id"], "-o", str(out))
    assert out.read_bytes() == data and "sha256 verified" in extracted.stderr


def test_a_partial_core_ships_under_its_own_name(server, tmp_path: Path) -> None:
    """core.partial.zst (the kernel stopped sending early): shipped as such, listed remotely as partial."""
    store = tmp_path / "store"
    path, rec = objectstores.stored_crash(store, 1 << 20, comm="cut")
    (path / CORE).rename(path / PARTIAL_CORE)
    rec["core"].update(file=PARTIAL_CORE, complete=False)
    (path / RECORD).write_text(json.dumps(rec))
    url = server.url("partial")
    cfg = config(tmp_path / "c.toml", store, f'ship_to = "{url}"\n')
    assert f"shipped {rec['id']}" in corepipe(cfg, server.env, "ship", "--once").stdout
    assert any(key.endswith(f"{rec['id']}/{PARTIAL_CORE}") for key in objects(server, "partial"))
    listed = json.loads(corepipe(cfg, server.env, "list", "--remote", url, "--json").stdout)
    assert [(item["id"], item["core_state"]) for item in listed] == [(rec["id"], "partial")]
    out = tmp_path / "core"
    extracted = corepipe(cfg, server.env, "extract", "--remote", url, rec["id"], "-o", str(out))
    assert file_digest(out, rec["core"]) and "of a partial core" in extracted.stderr


def test_network_loss_mid_upload(server, tmp_path: Path) -> None:
    """The server goes away in the middle of a core's parts: the sweep fails with one line, nothing looks
    complete, the crash stays; once the server is back the next sweep completes a verified object."""
    store = tmp_path / "store"
    path, rec = objectstores.stored_crash(store, 160 << 20, comm="netloss")
    cfg = config(tmp_path / "c.toml", store, f'ship_to = "{server.url("net")}"\nship_bandwidth = 33554432\n'
                                             "delete_after_ship = true\n")
    shipper = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(cfg), "ship", "--once"],
                               env={**os.environ, **server.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(lambda: parts_done(path) >= 2 or shipper.poll() is not None, 120, "two parts uploaded")
    server.stop()
    out, err = shipper.communicate(timeout=300)
    assert shipper.returncode == 1 and out == "", out + err
    errors = [line for line in err.splitlines() if line.startswith("corepipe ship: error:")]
    assert len(errors) == 1 and rec["id"] in errors[0], err
    assert (path / CORE).exists() and not (path / SHIPPED).exists()
    server.start()
    assert not any(key.endswith((CORE, RECORD)) for key in objects(server, "net"))
    assert f"shipped {rec['id']}" in corepipe(cfg, server.env, "ship", "--once").stdout
    listed = json.loads(corepipe(cfg, server.env, "list", "--remote", server.url("net"), "--json").stdout)
    assert [item["id"] for item in listed] == [rec["id"]] and not path.exists()
    core = next(size for key, size in objects(server, "net").items() if key.endswith(CORE))
    assert core == rec["core"]["compressed_size"]


def test_two_containers_of_one_image_upload_its_binaries_once(server, handler_dir: Path, docker_image: str) -> None:
    """Docker crashes land under <node>/docker/<container id>/; the image's executable is one object for both,
    and ``list --remote --image/--container`` select them from the metadata alone."""
    url = server.url("images")
    extra = f'ship_to = "{url}"\nship_node = "node-c"\n{NO_RATE_LIMIT}'
    names = [unique("corepipe-13"), unique("corepipe-13")]
    with installed_handler(handler_dir, config_extra=extra) as handler:
        try:
            for name in names:
                subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1", docker_image,
                                "/crasher", "0", "imgcrash"], capture_output=True, timeout=120)
            ids = [subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                                  check=True).stdout.strip() for name in names]
        finally:
            subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
        recs = [handler.wait_record(lambda r, cid=cid: r["container"]["id"] == cid) for cid in ids]
    assert all(rec["container"]["image"] == docker_image for rec in recs)
    exe = {e["build_id"] for rec in recs for e in rec["binaries"]["files"] if e["exe"] and e["stored"]}
    assert len(exe) == 1, recs[0]["binaries"]
    shipped = corepipe(handler.config, server.env, "ship", "--once").stdout
    assert all(f"shipped {rec['id']}" in shipped for rec in recs), shipped
    held = objects(server, "images")
    for rec, cid in zip(recs, ids):
        assert f"images/node-c/docker/{cid}/{Path(rec['_dir']).name}/{RECORD}" in held
    assert len([key for key in held if key.startswith("images/.build-id/")]) == len(
        {e["build_id"] for rec in recs for e in rec["binaries"]["files"] if e["stored"]})
    listed = json.loads(corepipe(handler.config, server.env, "list", "--remote", url, "--image",
                                 docker_image.rsplit(":", 1)[0], "--json").stdout)
    assert sorted(item["id"] for item in listed) == sorted(rec["id"] for rec in recs)
    one = json.loads(corepipe(handler.config, server.env, "list", "--remote", url, "--container", ids[1][:12],
                              "--json").stdout)
    assert [item["id"] for item in one] == [recs[1]["id"]]


def _ledger_on_disk(store: Path) -> tuple:
    """(the ledger the store's files hold, the ledger a scan of its directories makes), each as
    (cores per group with their binaries, group totals, binaries, records)."""
    from corepipe.domain import books, ledger
    from corepipe.platform.store import LEDGER, Store, read_file

    def comparable(held: ledger.Ledger) -> tuple:
        return ({(c.group, c.crash): (c.file, c.size, sorted(c.binaries)) for g in held.groups()
                 for c in held.cores(g)}, held.groups(), held.binaries, held.records)

    with Store(str(store), create=False) as opened, books.Books(opened, save=False) as kept:
        on_file = ledger.loads(read_file(opened.fd, LEDGER, 1 << 30), kept.load_group)
        assert on_file is not None, "no ledger"
        return comparable(on_file), comparable(books.rebuild_ledger(opened))


@pytest.mark.parametrize("kind", ["seaweedfs", "azure"])
def test_delete_after_ship_leaves_the_ledger_right_at_once(kind: str, handler_dir: Path, crasher: Path,
                                                           tmp_path: Path) -> None:
    """Shipped crashes deleted locally go through the store's books under its lock: the ledger admission reads
    forgets their cores, records and the binary only they used at once, not at prune's next rebuild."""
    server = objectstores.make(kind, tmp_path)
    server.start()
    try:
        extra = (f'binaries_host = true\nship_to = "{server.url("books")}"\nship_node = "node-a"\n'
                 f'delete_after_ship = true\n{NO_RATE_LIMIT}')
        with installed_handler(handler_dir, config_extra=extra) as handler:
            for name in ("books-one", "books-two"):
                crash([str(crasher), "0", name])
            recs = [handler.wait_record(lambda r, n=name: r["comm"] == n) for name in ("books-one", "books-two")]
            assert all(rec["core"]["stored"] for rec in recs)
            held, _scanned = _ledger_on_disk(handler.store)
            # Two cores, two records, the binary.
            assert len(held[0]) == 2 and sum(n for n, _ in held[3].values()) == 2 and held[2], held
            shipped = corepipe(handler.config, server.env, "ship", "--once")
            assert all(f"shipped {rec['id']}" in shipped.stdout for rec in recs), shipped.stdout + shipped.stderr
            assert not any(Path(rec["_dir"]).exists() for rec in recs)
            crash([str(crasher), "0", "books-kept"])  # collected after: counted on top of what the ship left
            kept = handler.wait_record(lambda r: r["comm"] == "books-kept")
        held, scanned = _ledger_on_disk(handler.store)
        assert held == scanned, "the ledger still counts what ship deleted"
        assert list(held[0]) == [tuple(Path(kept["_dir"]).relative_to(handler.store).as_posix().rsplit("/", 1))]
        assert sum(n for n, _ in held[3].values()) == 1, held
    finally:
        server.stop()


def test_a_bad_or_unreachable_destination_never_blocks_collection(handler_dir: Path, crasher: Path) -> None:
    """The resident shipper failing against a destination that refuses every connection (a port held, never
    listening) while real crashes come in: each is collected complete; then a ship_to that is not a destination
    at all: the crash is collected complete, its record says nothing of shipping (the collector does not read
    the shipper's keys), and the shipper stops on it with one line naming ship_to."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused, and the port stays ours
    dead = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{held.getsockname()[1]}"}
    extra = f'ship_to = "s3://crashes/fleet"\nship_retry_max = 1\n{NO_RATE_LIMIT}'
    with installed_handler(handler_dir, config_extra=extra) as handler:
        shipper = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(handler.config), "ship"],
                                   env={**os.environ, **dead}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            crash([str(crasher), "0", "unreach-1"])
            first = handler.wait_record(lambda r: r["comm"] == "unreach-1", timeout=60)
            failed = wait_for(lambda: _status(handler.store).get("ok") is False and _status(handler.store), 120,
                              "a failed sweep")
            assert "cannot ship" in failed["last_error"]["message"], failed
            crash([str(crasher), "0", "unreach-2"])
            second = handler.wait_record(lambda r: r["comm"] == "unreach-2", timeout=60)
        finally:
            os.kill(shipper.pid, signal.SIGTERM)
            shipper.wait()
            held.close()
        handler.config.write_text(handler.config.read_text().replace('"s3://crashes/fleet"', '"ftp://nowhere/x"'))
        crash([str(crasher), "0", "unreach-3"])
        third = handler.wait_record(lambda r: r["comm"] == "unreach-3", timeout=60)
        stopped = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(handler.config), "ship", "--once"],
                                 capture_output=True, text=True, timeout=60)
    for rec in (first, second, third):
        assert rec["status"] == "complete" and rec["collector"]["errors"] == [], (rec["comm"], rec["collector"])
        assert rec["core"]["stored"] and rec["core"]["complete"], rec["core"]
        assert (Path(rec["_dir"]) / CORE).exists() and not (Path(rec["_dir"]) / SHIPPED).exists()
    assert stopped.returncode == 1 and stopped.stdout == "", stopped
    [line] = stopped.stderr.splitlines()
    assert "ship_to: 'ftp://nowhere/x' is not a destination" in line, line
