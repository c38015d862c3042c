from __future__ import annotations

import os
import subprocess
import sys
import time

from support import need, read_line

from corepipe.domain import snapshot


def test_reads_a_live_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()",
                              "arg one"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={"SECRET_TOKEN": "s3cret", "PLAIN": "1"})
    try:
        assert read_line(child.stdout) == b"ready\n"
        snap = snapshot.take(child.pid, ns_pid=child.pid, uid=os.getuid(), gid=os.getgid())
        assert snap.trusted, snap.untrusted
        assert snap.cmdline()[-1] == "arg one"
        assert "SECRET_TOKEN=s3cret" in snap.environ()
        assert snap.exe == os.path.realpath(sys.executable)
        assert snap.status()["Pid"] == str(child.pid)
        assert snap.start_ticks and snap.text("cgroup")
    finally:
        child.kill()
        child.wait()


def test_uid_mismatch_makes_it_untrusted() -> None:
    snap = snapshot.take(os.getpid(), uid=os.getuid() + 1)
    assert not snap.trusted and "Uid" in snap.untrusted[0]


def test_ns_pid_mismatch_makes_it_untrusted() -> None:
    snap = snapshot.take(os.getpid(), ns_pid=os.getpid() + 1)
    assert not snap.trusted and "NSpid" in snap.untrusted[0]


def test_pidfd_of_another_process_makes_it_untrusted() -> None:
    need(hasattr(os, "pidfd_open"), "needs os.pidfd_open (Python 3.9 on Linux 5.3+)")
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        snap = snapshot.take(os.getpid(), pidfd=pidfd)
        assert not snap.trusted and "pidfd" in snap.untrusted[0]
    finally:
        os.close(pidfd)
        child.kill()
        child.wait()


def test_gone_process_is_tolerated() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    snap = snapshot.take(child.pid)
    assert snap.files == {} and snap.errors and not snap.trusted


def test_a_process_that_started_after_the_dump_time_is_not_the_crashed_one() -> None:
    """Without a pidfd (kernels before 6.16 have no %F), /proc/<pid> of a recycled PID is caught by its start time
    (field 22 of stat) against the kernel's dump time %t."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = snapshot.started_at(snapshot.take(child.pid).start_ticks)
        assert abs(started - time.time()) < 30  # the conversion from clock ticks since boot
        now = int(time.time())
        assert snapshot.take(child.pid, dump_time=now).trusted  # dumped after it started
        reused = snapshot.take(child.pid, dump_time=now - 600)  # the crash was before this process existed
        assert not reused.trusted
        assert reused.untrusted == [f"the process started {started - (now - 600):.0f} s after the dump time (%t): "
                                    "PID reused"]
        assert snapshot.take(child.pid, dump_time=int(started) - snapshot.START_SLACK + 1).trusted  # whole seconds
        need(hasattr(os, "pidfd_open"), "needs os.pidfd_open")
        pidfd = os.pidfd_open(child.pid)
        try:  # a pidfd proves which process it is: the start time is not needed
            assert snapshot.take(child.pid, pidfd=pidfd, dump_time=now - 600).trusted
        finally:
            os.close(pidfd)
    finally:
        child.kill()
        child.wait()
