"""The notification hook through the real kernel: once per new signature, as the configured user, the record on
stdin, killed with its whole session at notify_timeout."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import uuid
from pathlib import Path

from support import NO_RATE_LIMIT, crash, installed_handler, need_tool, short_tempdir, wait_for, wait_log


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
    nobody = pwd.getpwnam("nobody")
    out = short_tempdir()  # reachable by nobody
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
    for uid, groups, _body in outputs:
        assert int(uid) == nobody.pw_uid and groups.split() == [str(nobody.pw_gid)]
    sent = {json.loads(body)["comm"]: json.loads(body) for _u, _g, body in outputs}
    assert set(sent) == {first, other}
    for comm, rec in sent.items():
        assert rec["status"] == "complete" and rec["signature"] == records[comm]["signature"]
        assert records[comm]["notify"]["exit_status"] == 0 and records[comm]["notify"]["error"] is None
    assert "notify" not in records[again]  # the same signature: no second notification

    assert hung["notify"]["error"] == "timed out after 1 s (notify_timeout); killed" and hung["status"] == "complete"
    assert hung["notify"]["duration"] < 30
    wait_for(lambda: not _processes_with(marker) and not _processes_with(seconds), 10, "the hook's session gone")
