"""The notification hook through the real kernel: once per new signature, as a uid of its own, the record on stdin
(a sealed memory file no other user can take), killed with its whole session at notify_timeout, at most
notify_rate_limit times per policy group and window."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from support import NO_RATE_LIMIT, crash, installed_handler, need_tool, short_tempdir, wait_for, wait_log

from corepipe.platform import sandbox


def _processes_with(text: str) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_hook_runs_once_per_new_signature_as_its_user(bugs: dict) -> None:
    need_tool("gdb")
    out = short_tempdir()  # reachable by the hook's uid
    out.chmod(0o1777)
    run = uuid.uuid4().hex[:6]
    first, again, other, hang = (f"{what}-{run}" for what in ("nf", "na", "no", "nh"))
    hook = ["/bin/sh", "-c", f'f=$(mktemp -p {out} n.XXXXXX) && {{ id -u; id -G; cat; }} > "$f"']
    workdir = short_tempdir()
    workdir.chmod(0o755)
    config = NO_RATE_LIMIT + f"notify_command = {json.dumps(hook)}\n"
    try:
        with installed_handler(workdir, config_extra=config) as handler:
            for mode, comm in (("near-a", first), ("near-a", again), ("other", other)):
                crash([str(bugs["bugs"]), mode, comm])
                wait_log(f"({comm}) signal")  # the handler's last line: after the hook
            records = {r["comm"]: r for r in handler.records()}
            # A hook that hangs, in a background child too: its whole session is killed at notify_timeout.
            marker = uuid.uuid4().hex
            seconds = f"300.{uuid.uuid4().int % 10**9:09d}"  # the hook's sleeps, told from any other's
            handler.config.write_text(handler.config.read_text().replace(
                f"notify_command = {json.dumps(hook)}",
                f'notify_command = ["/bin/sh", "-c", "sleep {seconds} & sleep {seconds}; : {marker}"]\n'
                'notify_timeout = 1'))
            crash([str(bugs["bugs"]), "abort", hang])
            hung = handler.wait_record(lambda r: r["comm"] == hang and "notify" in r, timeout=60)
        outputs = [p.read_text().split("\n", 2) for p in sorted(out.iterdir())]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    assert len(outputs) == 2, outputs
    uids = [int(uid) for uid, _groups, _body in outputs]
    for uid, groups, _body in outputs:  # a uid no account has, a new one each time, and only its own group
        assert sandbox.UID_RANGE[0] <= int(uid) <= sandbox.UID_RANGE[1] and groups.split() == [uid]
    assert len(set(uids)) == 2
    sent = {json.loads(body)["comm"]: json.loads(body) for _u, _g, body in outputs}
    assert set(sent) == {first, other}
    for comm, rec in sent.items():
        assert rec["status"] == "complete" and rec["signature"] == records[comm]["signature"]
        assert records[comm]["notify"]["exit_status"] == 0 and records[comm]["notify"]["error"] is None
    assert "notify" not in records[again]  # the same signature: no second notification

    assert hung["notify"]["error"] == "timed out after 1 s (notify_timeout); killed" and hung["status"] == "complete"
    assert hung["notify"]["duration"] < 30
    wait_for(lambda: not _processes_with(marker) and not _processes_with(seconds), 10, "the hook's session gone")


#: Run as nobody (the account the hook once ran as): take the hook's stdin with pidfd_getfd, or open it through
#: /proc, and print what each attempt got.
_THIEF = """
import ctypes, os, sys
pid = int(sys.argv[1])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
fd = libc.syscall(438, pidfd, 0, 0)  # pidfd_getfd(pidfd, 0, 0)
print("getfd", os.pread(fd, 64, 0).decode(errors="replace") if fd >= 0 else os.strerror(ctypes.get_errno()))
try:
    print("open", open(f"/proc/{pid}/fd/0", "rb").read(64).decode(errors="replace"))
except OSError as exc:
    print("open", exc.strerror)
"""


def test_no_other_user_can_take_the_hooks_record_and_floods_are_rate_limited(bugs: dict) -> None:
    """Issue 30 item 5. A hook that waits: a process of uid 65534 tries pidfd_getfd and /proc/<pid>/fd/0 on it
    and gets neither; the stdin root sees is a memfd sealed against any change. Then, with notify_rate_limit 2,
    a third new signature of the same group is not notified, and its record and the log say why, with the count."""
    need_tool("gdb")
    out = short_tempdir()
    out.chmod(0o1777)
    run = uuid.uuid4().hex[:6]
    hook = ["/bin/sh", "-c", f'echo $$ > {out}/pid.$$; while [ ! -e {out}/go ]; do sleep 0.05; done; '
                             f'f=$(mktemp -p {out} n.XXXXXX) && cat > "$f"']
    workdir = short_tempdir()
    workdir.chmod(0o755)
    config = NO_RATE_LIMIT + f"notify_command = {json.dumps(hook)}\nnotify_timeout = 120\nnotify_rate_limit = 2\n"
    try:
        with installed_handler(workdir, config_extra=config) as handler:
            comms = [f"{mode}-{run}" for mode in ("near-a", "other", "abort")]
            crash([str(bugs["bugs"]), "near-a", comms[0]])
            pidfile = wait_for(lambda: next(out.glob("pid.*"), None), 120, "the hook to start")
            hook_pid = int(wait_for(pidfile.read_text, 10, "the hook's pid").strip())
            thief = subprocess.run([sys.executable, "-c", _THIEF, str(hook_pid)], capture_output=True, text=True,
                                   timeout=60)
            stdin = os.open(f"/proc/{hook_pid}/fd/0", os.O_RDONLY)
            seals = fcntl.fcntl(stdin, fcntl.F_GET_SEALS)
            os.close(stdin)
            (out / "go").touch()
            wait_log(f"({comms[0]}) signal")
            for mode, comm in zip(("other", "abort"), comms[1:]):
                crash([str(bugs["bugs"]), mode, comm])
                wait_log(f"({comm}) signal")
            records = {r["comm"]: r for r in handler.records()}
        sent = sorted(json.loads(p.read_text())["comm"] for p in out.glob("n.*"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    assert thief.returncode == 0, thief.stderr
    assert thief.stdout.splitlines() == ["getfd Operation not permitted", "open Permission denied"], thief.stdout
    assert seals == fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    assert sent == sorted(comms[:2]), sent
    held = records[comms[2]]["notify"]
    assert held["suppressed"].startswith("rate limited: 2 notifications of this policy group in the last 3600 s"), held
    assert held["exit_status"] is None and records[comms[2]]["signature"]["hash"] not in (
        records[c]["signature"]["hash"] for c in comms[:2])
    assert wait_log("no notification: rate limited: 2 notifications")
