"""How ``corepipe metrics`` sorts a record's core into a bounded set of outcomes and reasons, and keeps
labels clean and few."""

from __future__ import annotations

import json
import time

import pytest

from corepipe.domain import state
from corepipe.platform.config import Config
from corepipe.platform.store import STATE, Store
from corepipe.services.metrics import (
    MAX_DROPPED_GROUPS,
    MAX_LABEL,
    NEW_SIGNATURE,
    UNCONFIRMED,
    StoreCollector,
    _dropped,
    label,
    outcome,
    slim,
)


def rec(reason: object = None, stored: bool = False, status: str = "complete", **core: object) -> dict:
    return {"status": status, "core": {"stored": stored, "reason": reason, "complete": True, **core}}


@pytest.mark.parametrize(("record", "expected"), [
    (rec(stored=True), ("stored", "whole")),
    (rec("truncated at RLIMIT_CORE (4096 bytes)", stored=True, truncated=True), ("stored", "truncated")),
    (rec("the core ended after 10 of 20 bytes", stored=True, complete=False, status="failed"), ("stored", "partial")),
    (rec("deleted: container docker/ab is over container_max_cores (20) (room for crash 0123)"),
     ("stored", "deleted_container_max_cores")),
    (rec("deleted: the store is over max_use (100 bytes); host uses the most (room for crash 1)"),
     ("stored", "deleted_max_use")),
    (rec("rate limited: 3 cores of this signature in the last 3600 s (limit 3)"), ("rate_limited", "signature")),
    (rec("rate limited: 5 cores of this executable in the last 600 s (limit 5)"), ("rate_limited", "executable")),
    (rec("rate limited: 10 cores of this container in the last 600 s (limit 10)"), ("rate_limited", "container")),
    (rec("RLIMIT_CORE is 0"), ("rejected", "rlimit_core_zero")),
    (rec("no room for the core: max_use (1 bytes) leaves 0 bytes"), ("rejected", "no_room")),
    (rec("storm: 4 handlers busy storing a core (concurrent_cores)"), ("rejected", "storm")),
    (rec("the collector was saturated (too many crashes waiting): record only"), ("rejected", "saturated")),
    (rec("coredump socket: connection reset; no core", status="failed"), ("failed", "socket")),
    (rec("write failed: [Errno 28] No space left on device", status="failed"), ("failed", "write")),
    (rec("the kernel sent no core data (the pipe was empty)", status="failed"), ("failed", "empty")),
    (rec("something new", status="failed"), ("failed", "other")),
    (rec(status="collecting"), ("collecting", "collecting")),
])
def test_outcomes(record: dict, expected: tuple) -> None:
    assert outcome(record) == expected


def test_labels_are_one_printable_line() -> None:
    """Names a crashed process chose: undecodable bytes (lone surrogates), newlines and escapes become '?'."""
    assert label("crash\udcff\udcfe\n\x1b[31m") == "crash????[31m"
    assert label(None) == "" and len(label("x" * 1000)) == MAX_LABEL


def test_only_confirmed_containers_name_a_series() -> None:
    forged = {"container": {"runtime": "docker", "id": "f" * 64, "confidence": "likely"}, "signal": {"name": "SIGSEGV"}}
    confirmed = {"container": {"runtime": "docker", "id": "a" * 64, "name": "web", "image": "app:1",
                               "confidence": "certain"}, "signal": {"name": "SIGSEGV"}}
    family = StoreCollector(Config())._crashes([slim(forged), slim(confirmed)])
    assert sorted(tuple(s.labels.values()) for s in family.samples) == [
        ("docker", UNCONFIRMED, "", "", "", "SIGSEGV"), ("docker", "web", "app:1", "", "", "SIGSEGV")]


def test_slim_keeps_a_big_record_small() -> None:
    """What the endpoint keeps of a record of about 1 MiB (command line, mapped files) is under 2 KiB."""
    big = {"id": "0123456789ab", "status": "complete", "cmdline": ["x" * 1000] * 900,
           "signature": {"hash": "h", "text": "t" * 100_000, "site": "s"}, "binaries": {"files": ["/f"] * 10_000}}
    assert len(json.dumps(slim(big))) < 2048


def test_a_new_signature_gets_a_series_however_many_old_ones_crash_more() -> None:
    """With room for one signature, the one first seen within NEW_SIGNATURE takes it (the "new signature"
    alert needs its first-seen time) and the old, more frequent one goes to ``other``."""
    now = time.time()

    def crash(number: int, sig: str, when: float) -> tuple:
        return ("", slim({"id": f"{number:012x}", "timestamp": when, "signature": {"hash": sig, "text": sig}}))
    items = [crash(n, "old", now - 2 * NEW_SIGNATURE + n) for n in range(5)] + [crash(9, "new", now - 60)]
    crashes, _info, first, count = StoreCollector(Config())._signatures(items, 1)
    assert {s.labels["signature"]: s.value for s in crashes.samples} == {"new": 1, "other": 5}
    assert {s.labels["signature"]: s.value for s in first.samples} == {"new": now - 60}
    assert count.samples[0].value == 2


def test_dropped_records_keep_their_groups_few(tmp_path) -> None:  # noqa: ANN001 - pytest's tmp_path
    """A flood from many uids drops records in many groups: the MAX_DROPPED_GROUPS that dropped most get a
    series each, the rest are summed as ``other``, and a group name that is not one printable line is cleaned."""
    counts = state.State()
    for n in range(MAX_DROPPED_GROUPS + 5):
        counts.count(f"uid/{100000 + n}", "records_dropped", n + 1)
    counts.count("uid/\x1b[31mforged\n", "records_dropped", 1000)
    counts.count("uid/0", "something_else", 7)
    with Store(str(tmp_path / "store")) as store:
        store.write(STATE, counts.dumps())
    samples = {s.labels["policy_group"]: s.value for s in _dropped(str(tmp_path / "store")).samples}
    assert len(samples) == MAX_DROPPED_GROUPS + 1 and all("\n" not in g and "\x1b" not in g for g in samples)
    assert samples["other"] == sum(range(1, 7)) and samples[f"uid/{100000 + MAX_DROPPED_GROUPS + 4}"] == 25
    assert "uid/0" not in samples and sum(samples.values()) == sum(range(1, MAX_DROPPED_GROUPS + 6)) + 1000
