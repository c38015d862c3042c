"""How ``corepipe metrics`` sorts a record's core into a bounded set of outcomes and reasons."""

from __future__ import annotations

import pytest

from corepipe.services.metrics import outcome


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
