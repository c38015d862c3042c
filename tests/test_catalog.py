"""Reading the store back: records in the documented layout, links never followed, removal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corepipe import catalog, install, record
from corepipe.containers import Container
from corepipe.kernel import KernelArgs
from corepipe.store import RECORD, Store

CID = "ab" * 32


def file_crash(store: Path, container: Container, pid: int) -> str:
    """A crash filed the way the collector files it (store.Store + record.build)."""
    with Store(str(store)) as s:
        crash = s.new_crash(container.directory())
        try:
            rec = record.build(crash_id=crash.id, args=KernelArgs(pid=pid, signal=11, comm="x"), snapshot=None,
                               container=container, redact_env=[])
            crash.write(RECORD, record.dumps(rec))
        finally:
            crash.close()
    return crash.path


def test_iter_records_walks_the_layout(tmp_path: Path) -> None:
    store = tmp_path / "store"
    host = file_crash(store, Container(), 10)
    docker = file_crash(store, Container(runtime="docker", id=CID), 11)
    found = dict(catalog.iter_records(str(store)))
    assert set(found) == {host, docker}
    assert found[host]["pid"] == 10 and found[docker]["container"]["id"] == CID
    assert Path(docker).parent == store / "docker" / CID


def test_links_in_the_store_are_not_followed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    outside = tmp_path / "outside"
    planted = file_crash(outside, Container(runtime="docker", id=CID), 12)
    file_crash(store, Container(), 13)
    os.symlink(outside / "docker" / CID, store / "docker-link")
    (store / "podman").mkdir()
    os.symlink(outside / "docker" / CID, store / "podman" / "evil")
    host_crash = next(store.joinpath("host").iterdir())
    linked = store / "host" / "20260101T000000Z-000000000000"
    linked.mkdir()
    os.symlink(Path(planted) / RECORD, linked / RECORD)
    errors: list = []
    found = [rec["pid"] for _path, rec in catalog.iter_records(str(store), errors)]
    assert found == [13]
    assert len(errors) == 1 and str(linked) in errors[0]
    assert host_crash.exists()


def test_remove_crash_removes_empty_groups_only(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = file_crash(store, Container(runtime="docker", id=CID), 14)
    second = file_crash(store, Container(runtime="docker", id=CID), 15)
    catalog.remove_crash(str(store), first)
    assert not Path(first).exists() and Path(second).exists()
    catalog.remove_crash(str(store), second)
    assert not (store / "docker").exists() and store.is_dir()
    with pytest.raises(ValueError):
        catalog.remove_crash(str(store), str(tmp_path))


def test_purge_keeps_a_store_that_existed_before(tmp_path: Path) -> None:
    store = tmp_path / "store"
    file_crash(store, Container(), 16)
    file_crash(store, Container(runtime="docker", id=CID), 17)
    assert "deleted 2 crashes" in install.purge_store(str(store), created=False)
    assert store.is_dir() and list(catalog.iter_records(str(store))) == []
