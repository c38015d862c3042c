"""affinity.SharedCpu and Placement on real threads: a child process stands in for the kernel's dumping thread.

Placement's clock is the test's: each read takes the time its way's rate gives, so which way is faster is
the test's choice, and the real affinities of both threads are checked against it."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from support import need, wait_for

from corepipe.platform.affinity import LONGEST_SPELL, PROBE, Placement, SharedCpu, cpu_of


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


def test_part_gives_both_threads_their_cpus_back(task: int) -> None:
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(task)
    shared = SharedCpu(task, alive=lambda: True)
    shared.join()
    assert shared.joined and len(os.sched_getaffinity(task)) == 1
    shared.part()
    assert not shared.joined
    assert os.sched_getaffinity(0) == mine and os.sched_getaffinity(task) == theirs


READ = 150_000  # what one read of the coredump socket returns here


def _stream(placement: Placement, clock: list, rate: Callable[[int, bool], float], size: int) -> list:
    """Read ``size`` bytes through ``placement``, each read taking READ / rate(offset, joined) seconds; the way each
    read went (True: together), checked against both threads' real CPUs."""
    ways, done = [], 4 << 20
    while done < size:
        together = placement.shared.joined
        assert (len(os.sched_getaffinity(0)) == 1) == together
        assert (len(os.sched_getaffinity(placement.shared.tid)) == 1) == together
        clock[0] += READ / rate(done, together)
        done += READ
        ways.append(together)
        placement(done)
    return ways


@pytest.mark.parametrize("faster_together", [False, True])
def test_placement_probes_both_ways_and_keeps_to_the_faster(task: int, faster_together: bool) -> None:
    clock = [0.0]
    placement = Placement(SharedCpu(task, alive=lambda: True), clock=lambda: clock[0])
    ways = _stream(placement, clock, lambda _, together: 2e9 if together == faster_together else 1.3e9, 1 << 30)
    assert placement.together == faster_together
    slower = sum(way != faster_together for way in ways) * READ
    assert 2 * PROBE <= slower <= 1 << 30 >> 4  # probed, and for at most a sixteenth of the core
    assert placement.spell == LONGEST_SPELL  # each probe confirmed the way: the spells grew
    assert ways[-1] == faster_together


def test_placement_changes_way_when_the_other_gets_faster(task: int) -> None:
    """Random pages first (zstd the bottleneck: together reads as fast), then zeros (apart twice as fast)."""
    clock = [0.0]
    placement = Placement(SharedCpu(task, alive=lambda: True), clock=lambda: clock[0])
    half = 512 << 20
    ways = _stream(placement, clock, lambda at, together: 3e9 if at >= half and not together else (
        1.5e9 if at >= half else (1.1e9 if together else 1e9)), 1 << 30)
    early = ways[:len(ways) // 4]
    assert sum(early) > len(early) // 2  # together led on the random pages
    assert not placement.together and not ways[-1]
    late = ways[-(len(ways) // 4):]
    assert sum(late) * READ <= 2 * PROBE  # at most a probe's turn of the last quarter together


def test_placement_stops_when_the_threads_cannot_share_a_cpu(task: int) -> None:
    theirs = os.sched_getaffinity(task)
    clock = [0.0]
    placement = Placement(SharedCpu(task, alive=lambda: False), clock=lambda: clock[0])
    ways = _stream(placement, clock, lambda _, together: 1e9, 256 << 20)
    assert not any(ways) and placement.done and os.sched_getaffinity(task) == theirs


def test_a_gone_task() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    mine = os.sched_getaffinity(0)
    assert cpu_of(proc.pid) is None
    SharedCpu(proc.pid).join()
    assert os.sched_getaffinity(0) == mine
