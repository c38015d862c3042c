"""Subordinate uids share their owner's limits (issue 30 item 7), through the real kernel.

A throwaway user makes a user namespace; root maps a range of subordinate uids into it, as newuidmap does for
a user with an /etc/subuid range (rootless Podman's setup). Processes crash there as three subordinate uids:
the kernel reports each under its own host uid, and each was once a fresh policy group with limits of its
own. They must all count under the user, whose container_max_cores (2) then holds for them together.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from support import NO_RATE_LIMIT, installed_handler, need_tool, set_core_limit

from corepipe.platform import sandbox

#: Run as the user in a new user namespace: say its PID, then crash as subordinate uids 1, 2, 3 of the namespace,
#: each when told (after the maps; after the crash before it was recorded, so admissions come in crash order).
SCRIPT = """echo $$
for i in 1 2 3; do read go; setpriv --reuid=$i --regid=$i --clear-groups "$1" 0 "sub$i-$2"; done
exit 0
"""


def _free_range(count: int) -> int:
    used = sandbox._used_ids()
    for _ in range(64):
        start = sandbox.free_uid()
        if start + count <= sandbox.UID_RANGE[1] and not used & set(range(start, start + count)):
            return start
    raise AssertionError("no free range of uids")


def test_subordinate_uids_share_their_owners_limits(handler_dir: Path, crasher: Path) -> None:
    need_tool("setpriv")
    unshare = need_tool("unshare")
    user = sandbox.free_uid()
    sub = _free_range(3)
    program = handler_dir / "program"
    shutil.copy2(crasher, program)
    program.chmod(0o755)
    run = os.urandom(3).hex()

    def as_user() -> None:
        set_core_limit(-1)()
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)

    with installed_handler(handler_dir, NO_RATE_LIMIT + "container_max_cores = 2\n") as handler:
        proc = subprocess.Popen([unshare, "--user", "--", "sh", "-c", SCRIPT, "sh", str(program), run],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=as_user, cwd="/", text=True)
        pid = int(proc.stdout.readline())
        for name in ("uid_map", "gid_map"):  # what newuidmap/newgidmap write from the user's /etc/subuid range
            Path(f"/proc/{pid}/{name}").write_text(f"0 {user} 1\n1 {sub} 3\n")
        records = []
        for i in (1, 2, 3):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            records.append(handler.wait_record(lambda r, c=f"sub{i}-{run}": r["comm"] == c, 120))
            handler.wait_idle()
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        cores = list((handler.store / "uid" / str(user)).rglob("core.zst"))
        groups = sorted(p.name for p in (handler.store / "uid").iterdir())
    assert [r["uid"] for r in records] == [sub, sub + 1, sub + 2], [r["uid"] for r in records]
    for rec in records:  # every one under the user who owns the namespace
        assert Path(rec["_dir"]).parent == handler.store / "uid" / str(user), rec["_dir"]
    for rec in records:
        assert rec["container"]["details"]["owner_uid"] == user, rec["container"]
        assert rec["container"]["details"]["owner_from"] == "user namespace", rec["container"]
    assert groups == [str(user)], groups
    assert len(cores) == 2, cores  # the user's container_max_cores holds for the three together
