from __future__ import annotations

import os

import pytest

from corepipe.platform.store import Store, StoreError


def test_layout_and_modes(tmp_path) -> None:
    with Store(str(tmp_path / "s")) as store:
        crash = store.new_crash(("docker", "ab" * 32), 1700000000)
        crash.write("record.json", b"{}")
        crash.close()
    [path] = (tmp_path / "s" / "docker" / ("ab" * 32)).iterdir()
    assert path.name.startswith("20231114T221320Z-") and path.name.endswith(crash.id)
    assert oct(path.stat().st_mode & 0o777) == "0o700"
    assert oct((path / "record.json").stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.iterdir()] == ["record.json"]


def test_symlinked_root_is_refused(tmp_path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StoreError):
        Store(str(tmp_path / "link"))


def test_symlinked_container_dir_is_refused(tmp_path) -> None:
    os.makedirs(tmp_path / "s" / "docker", mode=0o700)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "s" / "docker" / "x").symlink_to(tmp_path / "elsewhere")
    with Store(str(tmp_path / "s")) as store, pytest.raises(StoreError):
        store.new_crash(("docker", "x"))
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_loose_permissions_are_tightened(tmp_path) -> None:
    os.makedirs(tmp_path / "s")
    os.chmod(tmp_path / "s", 0o777)
    Store(str(tmp_path / "s")).close()
    assert oct((tmp_path / "s").stat().st_mode & 0o777) == "0o700"


def test_failed_write_leaves_no_file(tmp_path) -> None:
    with Store(str(tmp_path / "s")) as store:
        crash = store.new_crash(("host",))
        with pytest.raises(TypeError):
            crash.write("record.json", None)  # type: ignore[arg-type]
        assert os.listdir(crash.fd) == []
        crash.close()
