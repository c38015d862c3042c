"""The store's accounting and lock on a real directory: state file damage, planted lock files, reservations."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from corepipe.domain import accounting
from corepipe.domain.books import Books
from corepipe.platform.config import Config
from corepipe.platform.lock import StoreLock
from corepipe.platform.store import LEDGER, LOCK, STATE, Store

MIB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(str(tmp_path / "store")) as opened:
        yield opened


def _cfg(**kw) -> Config:
    return Config(**{"rate_limit_container": 2, "rate_limit_exe": 0, "max_use": 0, "keep_free": 0, **kw})


def _state(store: Store) -> dict:
    return json.loads((Path(store.root) / STATE).read_text())


@pytest.mark.parametrize("damage", [b"", b"not json", b"[1, 2]", b'{"rate": 5, "reservations": []}',
                                    b'{"rate": {"container:host": 7}, "reservations": {"x": "y"}}'])
def test_a_damaged_state_file_is_replaced(store: Store, damage: bytes) -> None:
    (Path(store.root) / STATE).write_bytes(damage)
    admission = accounting.admit(store, _cfg(), crash_id="a" * 12, group=("host",), exe="/bin/x", want=MIB)
    assert admission.budget == MIB
    assert _state(store)["reservations"]["a" * 12][0] == MIB


def test_rate_limit_and_release(store: Store) -> None:
    cfg = _cfg()
    for n in range(2):
        assert accounting.admit(store, cfg, crash_id=f"{n:012x}", group=("docker", "c1"), exe="/x", want=MIB).budget
        with Books(store) as books:
            accounting.release(books, f"{n:012x}")
    third = accounting.admit(store, cfg, crash_id="2" * 12, group=("docker", "c1"), exe="/x", want=MIB)
    assert third.budget == 0 and third.reason.startswith("rate limited: 2 cores of this container")
    other = accounting.admit(store, cfg, crash_id="3" * 12, group=("docker", "c2"), exe="/x", want=MIB)
    assert other.budget == MIB, "one container's loop held back another's"
    assert set(_state(store)["reservations"]) == {"3" * 12}


def test_reservations_of_dead_handlers_are_dropped(store: Store) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = {"rate": {}, "reservations": {"d" * 12: [500 * MIB, dead.pid, 1, 1e12]}}
    (Path(store.root) / STATE).write_text(json.dumps(state))
    admission = accounting.admit(store, _cfg(max_use=500 * MIB + MIB // 2), crash_id="e" * 12, group=("host",),
                                 exe="/x", want=MIB)
    assert admission.budget == MIB
    assert set(_state(store)["reservations"]) == {"e" * 12}


def test_live_reservations_count(store: Store) -> None:
    cfg = _cfg(max_use=MIB + MIB // 2)
    assert accounting.admit(store, cfg, crash_id="1" * 12, group=("host",), exe="/a", want=MIB).budget == MIB
    second = accounting.admit(store, cfg, crash_id="2" * 12, group=("docker", "c"), exe="/b", want=MIB)
    assert second.budget == MIB // 2 and second.limited_by.startswith("max_use")


@pytest.mark.parametrize("plant", ["symlink", "fifo", "directory", "hardlink"])
def test_a_planted_lock_file_is_replaced_not_used(store: Store, tmp_path: Path, plant: str) -> None:
    target = tmp_path / "target"
    target.write_text("keep me\n")
    lock = Path(store.root) / LOCK
    if plant == "symlink":
        lock.symlink_to(target)
    elif plant == "fifo":
        os.mkfifo(lock)
    elif plant == "directory":
        lock.mkdir()
    else:
        os.link(target, lock)
    with StoreLock(store):
        st = os.lstat(lock)
        assert st.st_nlink == 1 and (st.st_mode & 0o170000) == 0o100000
    assert target.read_text() == "keep me\n" and target.stat().st_nlink == 1


def test_refusal_gives_admits_reason_and_changes_nothing(store: Store) -> None:
    """What the socket server asks before the dump: the same reason ``admit`` gives after, nothing recorded."""
    cfg, full = _cfg(rate_limit_container=1), _cfg(max_use=1000)
    assert accounting.refusal(store, cfg, group=("host",), exe="/x") is None
    assert accounting.admit(store, cfg, crash_id="1" * 12, group=("host",), exe="/x", want=MIB).budget
    before = _state(store)
    limited = accounting.refusal(store, cfg, group=("host",), exe="/x")
    no_room = accounting.refusal(store, full, group=("docker", "c1"), exe="/y")
    assert _state(store) == before
    assert limited.startswith("rate limited: 1 cores of this container")
    assert limited == accounting.admit(store, cfg, crash_id="2" * 12, group=("host",), exe="/x", want=MIB).reason
    assert no_room == "no room for the core: max_use (1000 bytes) leaves 0 bytes"
    assert no_room == accounting.admit(store, full, crash_id="3" * 12, group=("docker", "c1"), exe="/y",
                                       want=MIB).reason


def test_refusal_writes_no_rebuilt_ledger(store: Store) -> None:
    """Before the ack nothing is fsynced: a ledger refusal had to rebuild is left for admit to write."""
    cfg = _cfg()
    assert accounting.refusal(store, cfg, group=("host",), exe="/x") is None
    assert not os.path.exists(os.path.join(store.root, LEDGER))
    assert accounting.admit(store, cfg, crash_id="1" * 12, group=("host",), exe="/x", want=MIB).budget
    assert os.path.exists(os.path.join(store.root, LEDGER))
