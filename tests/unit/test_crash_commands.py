"""catalog, list/info/extract/rm on a store written by the store and compress modules (no kernel needed)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from support import core_digest, decompress, need

from corepipe.cli import main
from corepipe.commands import lookup
from corepipe.domain import batch, catalog, record
from corepipe.domain.containers import Container
from corepipe.platform import compress
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import CORE, RECORD, Store

T0 = 1_790_000_000  # 2026-09-21T...Z


def add_crash(root: Path, *, container: Container, when: int, comm: str = "app", signal: int = 11,
              core: bytes = b"", exe: str = "/usr/bin/app", tmp: Path, environ: tuple = ()) -> tuple:
    """A crash as collect files it: record + zstd core; returns (crash dir, record)."""
    with Store(str(root)) as store:
        crash = store.new_crash(container.policy_group(0), when)
        rec = record.build(crash_id=crash.id, args=KernelArgs(pid=100, ns_pid=1, tid=100, signal=signal, time=when,
                                                              comm=comm), snapshot=None, container=container,
                           redact_env=[])
        if environ:  # a host process's own variables, as record.build takes them from a snapshot
            rec["batch"] = batch.of_crash(None, False, container.runtime, list(environ))
        rec["exe"] = exe
        if core:
            source = tmp / f"core-{crash.id}"
            source.write_bytes(core)
            fd, name = crash.open_temp(CORE)
            with open(source, "rb") as f:
                result = compress.compress_stream(f.fileno(), fd, threads=0)
            crash.commit(fd, name, CORE)
            rec["core"].update(file=CORE, stored=True, size=result.size, compressed_size=result.compressed_size,
                               digest=result.digest)
        rec["status"] = "complete"
        crash.write(RECORD, record.dumps(rec))
        crash.close()
        return Path(crash.path), rec


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    (tmp_path / "c.toml").write_text(f'store = "{root}"\n')
    return root


@pytest.fixture
def crashes(store: Path, tmp_path: Path) -> dict:
    docker = Container(runtime="docker", id="a" * 64, confidence="certain", name="web",
                       image="registry.local/web:1.2")
    pod = Container(runtime="docker", id="b" * 64, confidence="certain", name="k8s_api", image="api:3",
                    pod_name="api-7f", pod_namespace="prod")
    hostd = Container(runtime="host", details={"system_unit": "hostd.service"})
    return {
        "host": add_crash(store, container=hostd, when=T0, comm="hostd", exe="/usr/sbin/hostd",
                          core=b"\x7fELF host core" * 1000, tmp=tmp_path),
        "web": add_crash(store, container=docker, when=T0 + 60, signal=6, core=b"\x7fELF web core" * 5000,
                         tmp=tmp_path),
        "api": add_crash(store, container=pod, when=T0 + 120, comm="api", exe="/srv/api", tmp=tmp_path),
    }


def cli(tmp_path: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple:
    code = main(["--config", str(tmp_path / "c.toml"), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def listed(tmp_path: Path, capsys: pytest.CaptureFixture, *args: str) -> list:
    code, out, err = cli(tmp_path, capsys, "list", "--json", *args)
    assert code == 0, err
    return [item["comm"] for item in json.loads(out)]


def test_iter_records_and_find(store: Path, crashes: dict) -> None:
    items = list(catalog.iter_records(str(store)))
    assert sorted(rec["id"] for _path, rec in items) == sorted(rec["id"] for _path, rec in crashes.values())
    path, rec = catalog.find(str(store), None)
    assert rec["comm"] == "api" and path == str(crashes["api"][0])
    web_id = crashes["web"][1]["id"]
    assert catalog.find(str(store), web_id[:7].upper())[1]["id"] == web_id
    with pytest.raises(catalog.LookupFailed, match="no crash with id"):
        catalog.find(str(store), next(c for c in "0123456789abcdef" if not any(
            r["id"].startswith(c) for _p, r in crashes.values())))
    with pytest.raises(catalog.LookupFailed, match="not a crash id"):
        catalog.find(str(store), "../etc")


def test_crashes_of_one_second_are_listed_in_the_order_they_came(store: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The kernel's %t has whole seconds; the record's ``received`` orders crashes within one, not their ids."""
    host = Container(runtime="host")
    names = [f"app{i}" for i in range(8)]
    for name in names:
        add_crash(store, container=host, when=T0, comm=name, tmp=tmp_path)
    assert listed(tmp_path, capsys) == names
    assert catalog.find(str(store), None)[1]["comm"] == names[-1]
    old = {"timestamp": T0, "id": "0" * 12}  # a record from before ``received``: taken at its dump time
    assert catalog.crash_order(old) < catalog.crash_order({"timestamp": T0, "received": T0 + 0.5, "id": "f"})


def test_ambiguous_prefix(store: Path, tmp_path: Path) -> None:
    ids = set()
    while True:  # ids are random: add crashes until two share a first digit
        _path, rec = add_crash(store, container=Container(runtime="host"), when=T0, tmp=tmp_path)
        if rec["id"][0] in ids:
            break
        ids.add(rec["id"][0])
    with pytest.raises(catalog.LookupFailed, match=f"id prefix {rec['id'][0]} is ambiguous: 2 crashes"):
        catalog.find(str(store), rec["id"][0])


def test_corrupt_and_planted_entries_are_reported_not_followed(store: Path, crashes: dict, tmp_path: Path) -> None:
    web_dir, web = crashes["web"]
    (web_dir / RECORD).write_text("{not json")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / RECORD).write_text(json.dumps({"schema": 1, "id": "0" * 12}))
    (store / "host" / "20260101T000000Z-000000000000").symlink_to(outside)
    problems: list = []
    items = list(catalog.iter_records(str(store), problems))
    assert {rec["comm"] for _path, rec in items} == {"hostd", "api"}
    assert [(path, message.split(":")[0]) for path, message in problems] == [(str(web_dir), "corrupt record.json")]


def test_missing_store_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "none"}"\n')
    assert cli(tmp_path, capsys, "list") == (0, "", "no crashes match\n")
    code, _out, err = cli(tmp_path, capsys, "info")
    assert code == 1 and "no crashes in" in err


def test_list_filters(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert listed(tmp_path, capsys) == ["hostd", "app", "api"]  # oldest first
    assert listed(tmp_path, capsys, "--container", "web") == ["app"]
    assert listed(tmp_path, capsys, "--container", "bbbb") == ["api"]
    assert listed(tmp_path, capsys, "--pod", "api-7f") == ["api"]
    assert listed(tmp_path, capsys, "--namespace", "prod") == ["api"]
    assert listed(tmp_path, capsys, "--namespace", "dev") == []
    assert listed(tmp_path, capsys, "--image", "registry.local/web") == ["app"]
    assert listed(tmp_path, capsys, "--image", "registry.local/web:1.2") == ["app"]
    assert listed(tmp_path, capsys, "--image", "registry.local") == []
    assert listed(tmp_path, capsys, "--signal", "abrt") == ["app"]
    assert listed(tmp_path, capsys, "--signal", "SIGSEGV") == ["hostd", "api"]
    assert listed(tmp_path, capsys, "--signal", "6") == ["app"]
    assert listed(tmp_path, capsys, "--exe", "hostd") == ["hostd"]
    assert listed(tmp_path, capsys, "--exe", "/srv/api") == ["api"]
    assert listed(tmp_path, capsys, "--since", f"@{T0 + 60}") == ["app", "api"]
    assert listed(tmp_path, capsys, "--until", f"@{T0 + 60}") == ["hostd", "app"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 + 60))
    assert listed(tmp_path, capsys, "--since", stamp, "--until", stamp + "Z") == ["app"]
    assert listed(tmp_path, capsys, "--since", "1h") == []
    assert listed(tmp_path, capsys, "-n", "2") == ["app", "api"]
    with pytest.raises(SystemExit):
        cli(tmp_path, capsys, "list", "--since", "yesterday-ish")


def test_list_table_when_piped(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _err = cli(tmp_path, capsys, "list")
    lines = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and lines[0] == ["ID", "TIME", "CONTAINER", "POD", "PID", "SIGNAL", "COMM", "SIZE", "STORED",
                                      "CORE"]
    rows = {row[6]: row for row in lines[1:]}
    assert rows["hostd"][2] == "host" and rows["hostd"][9] == "present"
    assert rows["hostd"][7] == "14K" and rows["hostd"][8] != "14K"  # uncompressed, then as stored
    assert rows["app"][2] == "web" and rows["app"][5] == "SIGABRT"
    assert rows["api"][3] == "prod/api-7f" and rows["api"][7] == "-" and rows["api"][9] == "none"
    assert all(len(row) == 10 for row in lines)


def test_json_schema(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _err = cli(tmp_path, capsys, "list", "--json")
    items = json.loads(out)
    path, rec = crashes["web"]
    item = next(i for i in items if i["id"] == rec["id"])
    assert item == {**rec, "path": str(path), "core_state": "present"}
    code, out, _err = cli(tmp_path, capsys, "info", "--json", rec["id"][:8])
    assert code == 0 and json.loads(out) == item


def test_info_is_readable(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, rec = crashes["web"]
    rec["backtrace"] = {"tool": "gdb", "text": "#0  main () at x.c:3\n\x1b[31mred\n", "error": None,
                        "truncated": False, "duration": 0.1}
    (path / RECORD).write_bytes(record.dumps(rec))
    code, out, _err = cli(tmp_path, capsys, "info", rec["id"])
    assert code == 0
    assert f"id:                  {rec['id']}" in out and "signal:              SIGABRT (6)" in out
    assert "container.name:      web" in out and "core:                present" in out
    assert "backtrace (gdb, 0.1 s):\n  #0  main () at x.c:3\n  ?[31mred" in out  # no terminal escapes


BATCH = {"pool": "pool-1", "job": "nightly-7", "task": "42", "node": "tvm-3"}


@pytest.fixture
def batch_crashes(store: Path, tmp_path: Path) -> dict:
    """A container task (its runtime's state has the variables: confirmed) and a host task (unconfirmed)."""
    task = Container(runtime="docker", id="c" * 64, confidence="certain", name="task42", image="app:1", batch=BATCH)
    host = Container(runtime="host")
    env = ("AZ_BATCH_POOL_ID=pool-1", "AZ_BATCH_JOB_ID=nightly-7", "AZ_BATCH_TASK_ID=43", "AZ_BATCH_NODE_ID=tvm-3")
    return {
        "task": add_crash(store, container=task, when=T0 + 180, comm="task", tmp=tmp_path),
        "hosttask": add_crash(store, container=host, when=T0 + 240, comm="hosttask", tmp=tmp_path, environ=env),
        "other": add_crash(store, container=host, when=T0 + 300, comm="other", tmp=tmp_path,
                           environ=("AZ_BATCH_JOB_ID=weekly-1", "AZ_BATCH_TASK_ID=42")),
    }


def test_batch_list_filters_and_cells(store: Path, crashes: dict, batch_crashes: dict, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    assert batch_crashes["task"][1]["batch"] == {**BATCH, "confirmed": True, "source": "docker state"}
    assert crashes["web"][1]["batch"] is None
    assert listed(tmp_path, capsys, "--job", "nightly-7") == ["task", "hosttask"]
    assert listed(tmp_path, capsys, "--task", "42") == ["task", "other"]
    assert listed(tmp_path, capsys, "--job", "nightly-7", "--task", "43") == ["hosttask"]
    assert listed(tmp_path, capsys, "--job", "nightly") == []  # ids match whole
    code, out, _err = cli(tmp_path, capsys, "list")
    rows = {row[6]: row for row in (line.split("\t") for line in out.splitlines()[1:])}
    assert rows["task"][2] == "task42 (nightly-7/42)" and rows["task"][3] == "-"
    assert rows["hosttask"][2] == "host (nightly-7/43?)"  # ?: from the process's own environment
    assert rows["app"][2] == "web" and rows["hostd"][2] == "host"


def test_batch_info(store: Path, batch_crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _err = cli(tmp_path, capsys, "info", batch_crashes["task"][1]["id"])
    assert code == 0
    for line in ("batch.pool:          pool-1", "batch.job:           nightly-7", "batch.task:          42",
                 "batch.node:          tvm-3", "batch.from:          docker state (confirmed)"):
        assert line in out
    code, out, _err = cli(tmp_path, capsys, "info", batch_crashes["hosttask"][1]["id"])
    assert "batch.task:          43" in out and "batch.from:          process environment (unconfirmed)" in out
    code, out, _err = cli(tmp_path, capsys, "info", batch_crashes["other"][1]["id"])
    assert "batch.pool" not in out and "batch.job:           weekly-1" in out


def test_extract_verifies(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, rec = crashes["web"]
    out = tmp_path / "web.core"
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(out))
    assert code == 0, err
    assert core_digest(out.read_bytes()) == rec["core"]["digest"] and "xxh3-128 verified" in err
    assert out.stat().st_mode & 0o777 == 0o600


def test_extract_verifies_an_old_record_by_its_sha256(store: Path, crashes: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A record written before core.digest states only core.sha256: extract checks that instead."""
    path, rec = crashes["web"]
    data = decompress(path / CORE, tmp_path / "plain")
    rec["core"]["digest"] = None
    rec["core"]["sha256"] = hashlib.sha256(data).hexdigest()
    (path / RECORD).write_bytes(record.dumps(rec))
    out = tmp_path / "web.core"
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(out))
    assert code == 0 and "sha256 verified" in err, err
    assert out.read_bytes() == data
    rec["core"]["sha256"] = "0" * 64
    (path / RECORD).write_bytes(record.dumps(rec))
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(tmp_path / "bad"))
    assert code == 1 and "does not match its record" in err and "sha256" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("digest", [None, {"algorithm": "md5", "value": "0" * 32}])
def test_extract_refuses_a_core_it_cannot_check(store: Path, crashes: dict, tmp_path: Path,
                                                capsys: pytest.CaptureFixture, digest: dict) -> None:
    path, rec = crashes["web"]
    rec["core"]["digest"] = digest
    (path / RECORD).write_bytes(record.dumps(rec))
    out = tmp_path / "web.core"
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(out))
    assert code == 1 and len(err.splitlines()) == 1 and ("states no digest" in err or "'md5' digest" in err), err
    assert not out.exists()


def test_extract_checksum_mismatch(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, rec = crashes["web"]
    rec["core"]["digest"]["value"] = "0" * 32
    (path / RECORD).write_bytes(record.dumps(rec))
    out = tmp_path / "web.core"
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(out))
    assert code == 1 and "does not match its record" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".web.core.*"))


def test_extract_refuses_a_replaced_core_of_the_same_size(store: Path, crashes: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A core.zst that decompresses cleanly, to as many bytes as recorded, but to other bytes: only the
    digest tells, and extract writes nothing."""
    path, rec = crashes["host"]
    data = bytearray(decompress(path / CORE, tmp_path / "plain"))
    data[len(data) // 3] ^= 0x01
    (path / CORE).write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(bytes(data)))
    out = tmp_path / "host.core"
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(out))
    assert code == 1 and "does not match its record" in err and "xxh3-128" in err, err
    assert not out.exists() and not list(tmp_path.glob(".host.core.*"))


def test_extract_corrupt_core(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, rec = crashes["host"]
    data = bytearray((path / CORE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / CORE).write_bytes(bytes(data))
    out = tmp_path / "host.core"
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(out))
    assert code == 1 and ("is corrupt" in err or "does not match" in err), err
    assert not out.exists() and not list(tmp_path.glob(".host.core.*"))


def test_missing_and_absent_cores(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, rec = crashes["web"]
    os.unlink(path / CORE)
    code, out, _err = cli(tmp_path, capsys, "list", "--container", "web")
    assert out.splitlines()[1].endswith("\tmissing")
    code, _out, err = cli(tmp_path, capsys, "extract", rec["id"], "-o", str(tmp_path / "x"))
    assert code == 1 and "is missing" in err
    code, _out, err = cli(tmp_path, capsys, "debug", rec["id"])
    assert code == 1 and "is missing" in err
    code, _out, err = cli(tmp_path, capsys, "extract", crashes["api"][1]["id"], "-o", str(tmp_path / "x"))
    assert code == 1 and "has no core" in err
    assert not (tmp_path / "x").exists()


def test_rm(store: Path, crashes: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    web_path, web = crashes["web"]
    api_path, api = crashes["api"]
    code, out, _err = cli(tmp_path, capsys, "rm", web["id"][:6], api["id"])
    assert code == 0 and f"removed {web['id']}" in out
    assert not web_path.exists() and not api_path.exists() and web_path.parent.is_dir()
    assert listed(tmp_path, capsys) == ["hostd"]
    code, _out, err = cli(tmp_path, capsys, "rm", web["id"])
    assert code == 1 and "no crash with id" in err


def test_rm_and_prune_on_a_store_missing_or_not_openable(store: Path, crashes: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Each command opens the store itself: none yet is nothing to prune and no crash to remove; a store whose path
    is a link (the store is opened without following links) is one line naming it and what to check (not "run as
    root", which is for a permission denied), and nothing is removed."""
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "none"}"\n')
    code, out, _err = cli(tmp_path, capsys, "prune")
    assert code == 0 and "does not exist yet: nothing to prune" in out
    code, _out, err = cli(tmp_path, capsys, "rm", crashes["web"][1]["id"])
    assert code == 1 and "no crash with id" in err and not (tmp_path / "none").exists()
    (tmp_path / "link").symlink_to(store)
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "link"}"\n')
    for command in (["prune"], ["rm", crashes["web"][1]["id"]]):
        code, out, err = cli(tmp_path, capsys, *command)
        assert code == 1 and len(err.splitlines()) == 1 and str(tmp_path / "link") in err, (command, out, err)
        assert "not a directory (a symlink?)" in err and "root-owned directory" in err and "as root" not in err
    assert crashes["web"][0].exists()
    denied = lookup.unreadable(str(store), PermissionError(errno.EACCES, "Permission denied"))
    assert str(denied) == f"cannot read the store {store}: Permission denied; run as root"


def test_debug_cleans_up_and_leaves_ctrl_c_to_the_debugger(store: Path, crashes: dict, tmp_path: Path) -> None:
    """A stand-in debugger hashes the core it got, sends Ctrl-C to its process group (corepipe's, in a session of
    its own: what a terminal's Ctrl-C reaches; corepipe itself is outside the debugger's PID namespace), and exits
    7; it sees only its sandbox (the store's crashes and this test's files are not there; the core and sysroot at
    their own paths)."""
    need(os.geteuid() == 0, "needs root: the debugger's sandbox")
    _path, rec = crashes["web"]
    script = (f'sha256sum "$0"; echo "$COREPIPE_SYSROOT"; ls -d {store}/host {tmp_path}/c.toml >/dev/null 2>&1; '
              'echo $?; trap "" INT; kill -INT 0; sleep 0.2; exit 7')  # a debugger handles Ctrl-C, as gdb does
    temp = tmp_path / "t"
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "debug",
                           "--debugger", f"sh -c {shlex.quote(script)}", rec["id"]],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(temp)},
                          start_new_session=True)
    assert proc.returncode == 7, proc.stderr
    digest, sysroot_dir, listed = proc.stdout.split("\n")[:3]
    expected = hashlib.sha256((tmp_path / f"core-{rec['id']}").read_bytes()).hexdigest()
    work = Path(sysroot_dir).parent
    assert digest.split() == [expected, str(work / "core")] and sysroot_dir == str(work / "root")
    assert work.parent == temp and listed == "2"  # ls: no such file, for both
    assert list(temp.iterdir()) == []  # the work directory is gone
