"""The host-wide slots that bound a crash storm's heavy work: real flocks, held by this and other processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from support import read_line, wait_for

from corepipe.platform import slots
from corepipe.platform.config import Config
from corepipe.platform.store import Store

SRC = Path(__file__).resolve().parents[2] / "src"


def _config(tmp_path: Path, **values: int) -> Config:
    return Config(store=str(tmp_path / "store"), **values)


def _holder(store: Path, kind: str) -> subprocess.Popen:
    """Another process holding one slot of ``kind`` until it is killed; returns once it holds it."""
    code = ("import sys\nfrom corepipe.platform import slots\nfrom corepipe.platform.config import Config\n"
            "from corepipe.platform.store import Store\n"
            f"cfg = Config(store={str(store)!r}, concurrent_cores=2, concurrent_postmortems=1, core_wait=0)\n"
            f"turn = slots.{kind}_turn(Store(cfg.store), cfg)\n"
            "print('held' if turn.fd is not None else turn.refused, flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(SRC)})
    assert read_line(proc.stdout).strip() == "held"
    return proc


def _holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds a flock on ``path`` (/proc/locks: "N: FLOCK ADVISORY WRITE pid dev:inode ...")."""
    if not path.exists():
        return False
    inode = str(path.stat().st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and str(pid) in fields and fields[fields.index(str(pid)) + 1].endswith(f":{inode}"):
            return True
    return False


def test_core_slots_refuse_beyond_the_count_and_come_back_when_a_holder_dies(tmp_path: Path) -> None:
    cfg = _config(tmp_path, concurrent_cores=2, core_wait=0)
    with Store(cfg.store) as store:
        first = slots.core_turn(store, cfg)
        other = _holder(tmp_path / "store", "core")
        try:
            refused = slots.core_turn(store, cfg)
            assert refused.fd is None and refused.refused.startswith("storm: 2 handlers busy storing cores")
            other.kill()  # killed, not finished: the kernel drops its lock all the same
            other.wait()
            again = slots.core_turn(store, cfg)
            assert again.fd is not None and again.refused is None
            again.close()
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
        first.close()
        assert all(turn.fd is not None for turn in [slots.core_turn(store, cfg), slots.core_turn(store, cfg)])
    assert oct((tmp_path / "store" / slots.DIRECTORY).stat().st_mode & 0o777) == "0o700"


def test_no_limit_and_one_per_cpu(tmp_path: Path) -> None:
    with Store(str(tmp_path / "store")) as store:
        unbounded = [slots.core_turn(store, _config(tmp_path, concurrent_cores=0)) for _ in range(3)]
        assert all(t.fd is None and t.refused is None and t.error is None for t in unbounded)
        cfg = _config(tmp_path, core_wait=0)
        cpus = len(os.sched_getaffinity(0))
        held = [slots.core_turn(store, cfg) for _ in range(cpus)]
        assert all(t.fd is not None for t in held)
        assert sorted(t.index for t in held) == list(range(cpus))  # each holder its own number (its CPU)
        assert all(t.index is None for t in unbounded)
        assert slots.core_turn(store, cfg).refused.startswith(f"storm: {cpus} handlers busy")
        for turn in held:
            turn.close()


def test_a_postmortem_waits_in_a_bounded_queue_for_a_free_slot(tmp_path: Path) -> None:
    cfg = _config(tmp_path, concurrent_postmortems=1, postmortem_wait=60)
    places = slots.WAITING_PER_SLOT
    with Store(cfg.store) as store:
        other = _holder(tmp_path / "store", "postmortem")
        queued = [slots._take(store, f"{slots.POSTMORTEM}-queue", places) for _ in range(places - 1)]
        assert None not in queued
        code = ("from corepipe.platform import slots\nfrom corepipe.platform.config import Config\n"
                "from corepipe.platform.store import Store\n"
                f"cfg = Config(store={cfg.store!r}, concurrent_postmortems=1, postmortem_wait=60)\n"
                "turn = slots.postmortem_turn(Store(cfg.store), cfg)\nprint(turn.fd is not None, turn.refused)\n")
        waiter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                  env={"PYTHONPATH": str(SRC)})
        try:
            # The waiter takes the last waiting place (seen in /proc/locks, without touching it), so another
            # handler is refused at once.
            queue = tmp_path / "store" / slots.DIRECTORY
            wait_for(lambda: any(_holds(waiter.pid, p) for p in queue.glob(f"{slots.POSTMORTEM}-queue.*")),
                     30, "the waiter to take its place")
            started = time.monotonic()
            refused = slots.postmortem_turn(store, cfg)
            assert time.monotonic() - started < 5
            assert refused.fd is None and refused.refused.endswith(f"and {places} waiting"), refused.refused
            assert waiter.poll() is None
            other.kill()
            other.wait()
            assert waiter.communicate(timeout=30)[0].split() == ["True", "None"]
        finally:
            for fd, _index in queued:
                os.close(fd)
            for proc in (other, waiter):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def test_a_turn_gives_up_after_its_wait(tmp_path: Path) -> None:
    cfg = _config(tmp_path, concurrent_cores=1, core_wait=1)
    with Store(cfg.store) as store:
        held = slots.core_turn(store, cfg)
        started = time.monotonic()
        turn = slots.core_turn(store, cfg)
        assert time.monotonic() - started >= 1
        assert turn.fd is None and turn.refused.endswith("waited 1 s"), turn.refused
        assert turn.refused.startswith("storm: 1 handlers busy storing cores (concurrent_cores)")
        held.close()


def test_planted_files_are_refused_not_followed(tmp_path: Path) -> None:
    """A link where the slots go makes the turn unbounded with the error said, and touches nothing outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    cfg = _config(tmp_path, concurrent_cores=1)
    with Store(cfg.store) as store:
        (tmp_path / "store" / slots.DIRECTORY).symlink_to(outside)
        turn = slots.core_turn(store, cfg)
        assert turn.fd is None and turn.refused is None and "not a directory" in turn.error
        assert not list(outside.iterdir())
        (tmp_path / "store" / slots.DIRECTORY).unlink()
        (tmp_path / "store" / slots.DIRECTORY).mkdir(mode=0o700)
        os.mkfifo(tmp_path / "store" / slots.DIRECTORY / "core.0")
        turn = slots.core_turn(store, cfg)
        assert turn.fd is None and "not a plain file" in turn.error
