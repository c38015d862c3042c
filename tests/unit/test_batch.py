"""The record's ``batch``: from a confirmed container's runtime state, else the process environment, unconfirmed."""

from __future__ import annotations

import os
import subprocess

from corepipe.domain import batch, containers, record, snapshot
from corepipe.platform.kernel import parse_args

AGENT = ["AZ_BATCH_POOL_ID=pool-1", "AZ_BATCH_JOB_ID=nightly-7", "AZ_BATCH_TASK_ID=42",
         "AZ_BATCH_NODE_ID=tvm-3", "PATH=/bin"]


def test_from_env_reads_the_four_variables_only() -> None:
    assert batch.from_env(AGENT) == {"pool": "pool-1", "job": "nightly-7", "task": "42", "node": "tvm-3"}
    assert batch.from_env(["PATH=/bin", "AZ_BATCH_NODE_ROOT_DIR=/mnt/batch/tasks"]) is None
    assert batch.from_env(["AZ_BATCH_JOB_ID=j"]) == {"pool": None, "job": "j", "task": None, "node": None}
    assert batch.from_env(["AZ_BATCH_JOB_ID=first", "AZ_BATCH_JOB_ID=second"])["job"] == "first"  # as getenv


def test_from_env_takes_only_a_list_of_strings() -> None:
    """A state file is data: a wrong type anywhere is no batch, never an exception."""
    for junk in (None, "AZ_BATCH_JOB_ID=j", {"AZ_BATCH_JOB_ID": "j"}, 7, [7, None, ["AZ_BATCH_JOB_ID=j"]]):
        assert batch.from_env(junk) is None


def test_values_are_bounded() -> None:
    """Hostile values: cut at VALUE_MAX characters, control characters (terminal escapes) replaced."""
    found = batch.from_env(["AZ_BATCH_JOB_ID=" + "j" * 100_000, "AZ_BATCH_TASK_ID=\x1b[2Jt\n\x7f\x9b1"])
    assert found["job"] == "j" * batch.VALUE_MAX
    assert found["task"] == "?[2Jt???1"


def test_of_crash_prefers_the_confirmed_state() -> None:
    forged = ["AZ_BATCH_JOB_ID=forged"]
    state = batch.from_env(AGENT)
    confirmed = batch.of_crash(state, True, "docker", forged)
    assert confirmed == {**state, "confirmed": True, "source": "docker state"}
    assert batch.of_crash({}, True, "docker", forged) is None  # the state has none: the process cannot add one
    assert batch.of_crash(state, False, "docker", forged) == {"pool": None, "job": "forged", "task": None,
                                                              "node": None, "confirmed": False,
                                                              "source": batch.ENVIRON}
    assert batch.of_crash(None, True, "podman", AGENT)["confirmed"] is False  # a state not read for it
    assert batch.of_crash(None, False, "host", ["PATH=/bin"]) is None


def _record(snap, container: containers.Container) -> dict:
    args = parse_args([str(snap.pid), "7", "8", "0", "0", "11", "1700000000", "0", "2", "-", "h", "c"])
    return record.build(crash_id="abc123abc123", args=args, snapshot=snap, container=container, redact_env=[])


def test_a_host_process_environment_is_unconfirmed() -> None:
    """Read from a real process's /proc/<pid>/environ, as the handler reads it."""
    env = {**os.environ, **dict(entry.split("=", 1) for entry in AGENT)}
    child = subprocess.Popen(["sleep", "30"], env=env)
    try:
        rec = _record(snapshot.take(child.pid), containers.Container())
    finally:
        child.kill()
        child.wait()
    assert rec["batch"] == {"pool": "pool-1", "job": "nightly-7", "task": "42", "node": "tvm-3", "confirmed": False,
                            "source": "process environment"}
    assert "AZ_BATCH_JOB_ID=<redacted>" in rec["process"]["environ"]  # the environment itself stays redacted


def test_an_untrusted_snapshot_gives_no_batch() -> None:
    snap = snapshot.take(os.getpid())
    snap.untrusted.append("PID reused")
    snap.files["environ"] = b"AZ_BATCH_JOB_ID=j\0"
    assert _record(snap, containers.Container(runtime="unknown"))["batch"] is None
