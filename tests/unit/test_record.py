from __future__ import annotations

import json
import os

import pytest

from corepipe.domain import containers, record, snapshot
from corepipe.platform.kernel import parse_args

KEYS = {"schema", "id", "status", "time", "timestamp", "received", "pid", "ns_pid", "tid", "uid", "gid", "signal",
        "comm", "exe", "cmdline", "cwd", "hostname", "dump_mode", "core_limit", "container", "batch", "cgroup",
        "process", "core", "collector", "truncated"}


def _record(snap=None) -> dict:
    args = parse_args([str(os.getpid()), "7", "8", "0", "0", "6", "1700000000", "0", "2", "-", "h", "c"])
    return record.build(crash_id="abc123abc123", args=args, snapshot=snap,
                        container=containers.Container(), redact_env=["TOKEN"])


def test_schema_fields() -> None:
    snap = snapshot.take(os.getpid())
    rec = _record(snap)
    assert set(rec) == KEYS
    assert rec["signal"] == {"number": 6, "name": "SIGABRT"}
    assert rec["time"] == "2023-11-14T22:13:20Z" and rec["dump_mode"] == 2
    assert set(rec["core"]) == {"file", "stored", "reason", "size", "compressed_size", "sha256", "digest", "truncated",
                                "complete", "compression"}
    assert set(rec["container"]) >= {"runtime", "id", "name", "image", "pod_name", "pod_namespace", "pod_uid"}
    assert record.load(record.dumps(rec)) == json.loads(json.dumps(rec))


def test_without_snapshot() -> None:
    rec = _record()
    assert rec["exe"] is None and rec["process"]["trusted"] is False


def test_redaction() -> None:
    env = ["GITHUB_TOKEN=abc", "PATH=/bin", "token_x=1", "NOVALUE"]
    assert record.redact(env, ["TOKEN"]) == ["GITHUB_TOKEN=<redacted>", "PATH=/bin", "token_x=<redacted>", "NOVALUE"]


def test_load_rejects_other_schemas() -> None:
    for other in (b'{"schema": 99}', b'{"schema": true}', b'{"schema": 1.0}', b'{"schema": "2"}', b"[2]"):
        with pytest.raises(ValueError):
            record.load(other)


def test_load_takes_every_schema_so_far() -> None:
    """Schema 2 only added ``batch``: records of schema 1 (no ``batch``) still load."""
    assert record.SCHEMA == 2 and _record()["schema"] == 2
    assert record.load(b'{"schema": 1, "id": "x"}')["id"] == "x"


def test_unknown_signal_number() -> None:
    assert record.signal_name(200) is None and record.signal_name(11) == "SIGSEGV"
