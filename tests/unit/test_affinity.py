"""affinity.SharedCpu on real threads: a child process stands in for the kernel's dumping thread."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

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
