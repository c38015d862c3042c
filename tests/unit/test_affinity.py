"""affinity.SharedCpu on real threads: a child process stands in for the kernel's dumping thread."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need, wait_for

from corepipe.platform.affinity import SharedCpu, cpu_of


@pytest.fixture
def task() -> Iterator[int]:
    """A busy process (a running task moves at once when its CPUs change, as the dumping thread does) on all
    this thread's CPUs, and this thread's CPUs restored afterwards."""
    need(len(os.sched_getaffinity(0)) >= 2, "needs 2 CPUs: the test moves threads onto one")
    mine = os.sched_getaffinity(0)
    proc = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        yield proc.pid
    finally:
        os.sched_setaffinity(0, mine)
        proc.kill()
        proc.wait()


def test_join_puts_both_on_the_tasks_cpu_and_leave_gives_this_thread_its_cpus_back(task: int) -> None:
    mine = os.sched_getaffinity(0)
    shared = SharedCpu(task, alive=lambda: True)
    shared.join()
    cpu = cpu_of(task)
    assert os.sched_getaffinity(task) == {cpu} and os.sched_getaffinity(0) == {cpu}
    shared.leave()
    assert os.sched_getaffinity(0) == mine
    assert os.sched_getaffinity(task) == {cpu}  # the dumping thread runs no user code again: it keeps the one
    shared.leave()  # twice is harmless
    assert os.sched_getaffinity(0) == mine


def test_the_slot_picks_the_cpu(task: int) -> None:
    """Streams at the same time hold different core slots: each gets a CPU of its own."""
    mine = sorted(os.sched_getaffinity(0))
    for slot in range(len(mine) + 1):
        shared = SharedCpu(task, alive=lambda: True)
        shared.join(slot)
        cpu = mine[slot % len(mine)]
        assert os.sched_getaffinity(task) == {cpu} and os.sched_getaffinity(0) == {cpu}
        shared.leave()
        assert sorted(os.sched_getaffinity(0)) == mine


def test_a_slots_cpu_outside_the_tasks_cpuset_falls_back_to_the_tasks(task: int) -> None:
    """A container's cpuset refuses the slot's CPU: the task and the reader share the CPU the task is on."""
    root = Path("/sys/fs/cgroup/cpuset")
    need(os.geteuid() == 0 and (root / "cpuset.cpus").exists(), "needs root and the cgroup v1 cpuset hierarchy")
    mine = sorted(os.sched_getaffinity(0))
    allowed, refused = mine[0], mine[1]
    group = root / f"cp-affinity-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    try:
        (group / "cpuset.cpus").write_text(str(allowed))
        (group / "cpuset.mems").write_text((root / "cpuset.mems").read_text())
        (group / "cgroup.procs").write_text(str(task))
        wait_for(lambda: cpu_of(task) == allowed, 10, "the task to move into its cpuset")
        shared = SharedCpu(task, alive=lambda: True)
        shared.join(mine.index(refused))
        assert os.sched_getaffinity(task) == {allowed} and os.sched_getaffinity(0) == {allowed}
        shared.leave()
    finally:
        (root / "cgroup.procs").write_text(str(task))
        group.rmdir()


def test_a_task_no_longer_alive_is_left_alone(task: int) -> None:
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(task)
    shared = SharedCpu(task, alive=lambda: False)
    shared.join()
    shared.leave()
    assert os.sched_getaffinity(0) == mine and os.sched_getaffinity(task) == theirs


def test_a_cpu_this_thread_may_not_use_is_not_shared(task: int) -> None:
    """The server limited to some CPUs (systemd's CPUAffinity=) never moves onto another."""
    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    os.sched_setaffinity(task, {cpu})
    wait_for(lambda: cpu_of(task) == cpu, 10, "the task to move")
    os.sched_setaffinity(0, mine - {cpu})
    shared = SharedCpu(task)
    shared.join()
    assert os.sched_getaffinity(0) == mine - {cpu} and os.sched_getaffinity(task) == {cpu}


def test_a_gone_task() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    mine = os.sched_getaffinity(0)
    assert cpu_of(proc.pid) is None
    SharedCpu(proc.pid).join()
    assert os.sched_getaffinity(0) == mine
