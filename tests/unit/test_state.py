"""The store's state file (domain/state.py) through the books (domain/books.py): a garbled or hostile
``.state.json`` costs its bad entries, never a handler, with one line logged; the per-group counters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corepipe.domain import accounting, books, state
from corepipe.domain.books import Books
from corepipe.platform.config import Config
from corepipe.platform.store import STATE, Store

MIB = 1 << 20
GOOD_TIME = 1.7e9


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(str(tmp_path / "store")) as opened:
        yield opened


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list:
    """The lines the books log (the kernel log and syslog are the host's)."""
    lines: list = []
    monkeypatch.setattr(books, "log", lambda message, level=6: lines.append(message))
    return lines


def _cfg() -> Config:
    return Config(rate_limit_container=0, rate_limit_exe=0, max_use=0, keep_free=0)


GARBLED = {
    "empty": b"",
    "not json": b"\x00\xffnot json{",
    "a list": b"[1, 2]",
    "a string": b'"state"',
    "nested too deep": b"[" * 200000 + b"]" * 200000,
    "truncated": b'{"rate": {"container:host": [1.0, 2.',
}


@pytest.mark.parametrize("name", sorted(GARBLED))
def test_a_garbled_state_file_starts_anew_with_one_line(store: Store, logged: list, name: str) -> None:
    (Path(store.root) / STATE).write_bytes(GARBLED[name])
    admission = accounting.admit(store, _cfg(), crash_id="a" * 12, group=("host",), exe="/bin/x", want=MIB)
    assert admission.budget == MIB
    assert len(logged) == 1 and "starting a new one" in logged[0], logged
    loaded, dropped = state.loads((Path(store.root) / STATE).read_bytes())
    assert dropped == 0 and set(loaded.reservations) == {"a" * 12}


HOSTILE = {
    "rate": {"container:host": [GOOD_TIME, "1", None, True, float("nan"), -5, float("inf"), [1]],
             "exe:x": "not a list"},
    "reservations": {"r1": [MIB, os.getpid(), None, GOOD_TIME], "bad size": [-1, 1, None, GOOD_TIME],
                     "bool pid": [MIB, True, None, GOOD_TIME], "short": [MIB], "text": "x",
                     "nan time": [MIB, 1, None, float("nan")]},
    "signatures": {"host abc": GOOD_TIME, "host bad": "yesterday", "host inf": float("inf")},
    "counters": {"host": {"records_dropped": 3, "neg": -1, "float": 1.5, "bool": False}, "uid/1": [1]},
}
#: Entries of the wrong type above: 7 times, 1 rate list, 5 reservations, 2 signatures, 3 counts, 1 group.
HOSTILE_BAD = 19


def test_entries_of_the_wrong_type_are_dropped_and_counted(store: Store, logged: list) -> None:
    """NaN, Infinity, bools, negative sizes, strings for numbers: each dropped, the rest kept, one line."""
    data = json.dumps(HOSTILE).encode()  # json writes NaN and Infinity, and reads them back
    loaded, dropped = state.loads(data)
    assert dropped == HOSTILE_BAD
    assert loaded.rate == {"container:host": [GOOD_TIME]}
    assert loaded.reservations == {"r1": state.Reservation(MIB, os.getpid(), None, GOOD_TIME)}
    assert loaded.signatures == {"host abc": GOOD_TIME}
    assert loaded.counters == {"host": {"records_dropped": 3}}

    (Path(store.root) / STATE).write_bytes(data)
    with Books(store) as opened:
        assert opened.state.counter("host", "records_dropped") == 3
    assert logged == [f"error: {store.root}/{STATE}: dropped {HOSTILE_BAD} entries of the wrong type"]
    again, dropped = state.loads((Path(store.root) / STATE).read_bytes())
    assert dropped == 0 and again == loaded, "the cleaned state was not written back"


def test_a_planted_state_file_is_never_followed(store: Store, tmp_path: Path, logged: list) -> None:
    target = tmp_path / "target"
    target.write_text('{"rate": {}}')
    (Path(store.root) / STATE).symlink_to(target)
    with Books(store) as opened:
        opened.state.count("host", "records_dropped")
    assert target.read_text() == '{"rate": {}}'
    assert not (Path(store.root) / STATE).is_symlink() and len(logged) == 1, logged


def test_counters_per_group(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a later owner (the notify hook's rate limit, the record budget) counts: per policy group, kept
    across handlers, bounded in groups."""
    with Books(store) as opened:
        assert opened.state.count("uid/1000", "records_dropped") == 1
        assert opened.state.count("uid/1000", "records_dropped", 4) == 5
    with Books(store) as opened:
        assert opened.state.counter("uid/1000", "records_dropped") == 5
        assert opened.state.counter("host", "records_dropped") == 0
    monkeypatch.setattr(state, "MAX_GROUPS", 2)
    with Books(store) as opened:
        opened.state.count("host", "x")
        opened.state.count("uid/1", "x")
        opened.state.count("uid/2", "x")
        assert set(opened.state.counters) == {"uid/1000", "host", state.OTHER}


def test_unchanged_state_is_not_written(store: Store) -> None:
    with Books(store) as opened:
        opened.state.count("host", "x")
    before = os.stat(Path(store.root) / STATE).st_ino
    with Books(store) as opened:
        assert opened.state.counter("host", "x") == 1
    assert os.stat(Path(store.root) / STATE).st_ino == before
