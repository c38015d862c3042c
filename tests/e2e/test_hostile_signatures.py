"""Signatures under attack, through the real kernel (issue 30, items 8 and 10): a program whose symbol is a
120 KB name built to make the signature rules' expressions work for seconds, and an unprivileged user who
crashes a program first to spend root's cores of that crash site and take root's notification."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import uuid
from pathlib import Path

from support import NO_RATE_LIMIT, crash, installed_handler, need_tool, set_core_limit, short_tempdir

from corepipe.domain import signature

NOBODY = 65534
#: The crashing function's symbol: the review's ``f(f(f(...`` (its argument expression's work grew with the
#: square of the length: 3.5 s here) then ``.part.part...x`` (the clone-suffix expression's: 30 s here).
HOSTILE_NAME = "f(" * 5000 + ".part" * 22000 + "x"
#: The handler's own time limit in this test: far above what the cut rules cost (milliseconds), far below
#: what the uncut ones did, which ended in the time limit and a crash-site signature.
TIMEOUT = 20

_VICTIM = """
__attribute__((noinline)) void victim(volatile int *p) { *p = 1; }
int main(void) { victim(0); return 0; }
"""


def _hostile_program(directory: Path) -> Path:
    """A program that crashes in a function whose symbol is HOSTILE_NAME (no debug info: gdb names the frame
    from the symbol table)."""
    gcc, objcopy = need_tool("gcc"), need_tool("objcopy")
    (directory / "victim.c").write_text(_VICTIM)
    plain = directory / "victim"
    subprocess.run([gcc, "-O0", "-o", str(plain), str(directory / "victim.c")], check=True)
    (directory / "syms").write_text(f"victim {HOSTILE_NAME}\n")
    program = directory / "hostile"
    subprocess.run([objcopy, "--redefine-syms", str(directory / "syms"), str(plain), str(program)], check=True)
    assert HOSTILE_NAME in subprocess.run(["nm", str(program)], capture_output=True, text=True).stdout
    return program


def test_a_huge_symbol_name_gets_a_bounded_signature_within_the_time_limit(handler_dir: Path) -> None:
    need_tool("gdb")
    program = _hostile_program(handler_dir)
    with installed_handler(handler_dir, f"timeout = {TIMEOUT}\nbacktrace_timeout = {TIMEOUT}\n") as handler:
        crash([str(program)])
        rec = handler.wait_record(lambda r: r["exe"] == str(program), timeout=120)
    assert rec["backtrace"]["frames"][0]["function"].startswith(HOSTILE_NAME[:4096])  # gdb gave the name
    sig = rec["signature"]
    assert rec["status"] == "complete" and rec["collector"]["errors"] == [], rec["collector"]["errors"]
    assert sig["source"] == "backtrace", sig
    assert sig["frames"] == [HOSTILE_NAME[:signature.MAX_LABEL], "main"]
    assert sig["text"] == f"hostile SIGSEGV: {HOSTILE_NAME[:signature.MAX_LABEL]} | main"


def _hook(out: Path) -> list:
    """A notify_command that files each record it gets in ``out``."""
    return ["/bin/sh", "-c", f'f=$(mktemp -p {out} n.XXXXXX) && cat > "$f"']


def _as_nobody() -> None:
    set_core_limit(resource.RLIM_INFINITY)()
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_another_users_crashes_spend_neither_roots_cores_nor_its_notification(handler_dir: Path,
                                                                               crasher: Path) -> None:
    """uid 65534 crashes a program three times with signature_max_cores = 2; then root crashes the same program
    at the same place: root's core is kept, and root's notification fires."""
    program = handler_dir / "program"
    shutil.copy2(crasher, program)
    program.chmod(0o755)
    out = short_tempdir()  # where the hook (run as nobody) writes
    out.chmod(0o1777)
    run = uuid.uuid4().hex[:6]
    config = NO_RATE_LIMIT + f"signature_max_cores = 2\nnotify_command = {json.dumps(_hook(out))}\n"
    try:
        with installed_handler(handler_dir, config) as handler:
            for i in range(3):
                subprocess.run([str(program), "0", f"squat{i}-{run}"], preexec_fn=_as_nobody, capture_output=True,
                               timeout=120, cwd="/")
                handler.wait_record(lambda r, i=i: r["comm"] == f"squat{i}-{run}", timeout=120)
                handler.wait_idle()  # the hook has run
            crash([str(program), "0", f"root-{run}"])
            root = handler.wait_record(lambda r: r["comm"] == f"root-{run}", timeout=120)
            handler.wait_idle()
            records = {r["comm"]: r for r in handler.records()}
        notified = sorted(json.loads(p.read_text())["comm"] for p in out.iterdir())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    squats = [records[f"squat{i}-{run}"] for i in range(3)]
    assert [r["uid"] for r in squats] == [NOBODY] * 3 and root["uid"] == 0
    assert {r["signature"]["site"] for r in squats} == {root["signature"]["site"]}  # one crash site
    # The limit holds within the user's own group...
    assert [r["core"]["stored"] for r in squats] == [True, True, False]
    assert squats[2]["core"]["reason"].startswith("rate limited: 2 cores of this signature"), squats[2]["core"]
    # ...and root's crash of the same site is not held back by it.
    assert root["core"]["stored"] is True, root["core"]
    assert Path(root["_dir"]).parent.name == "0" and Path(squats[0]["_dir"]).parent.name == str(NOBODY)
    # One notification per group: the user's first crash, and root's.
    assert notified == sorted([f"squat0-{run}", f"root-{run}"]), notified
    assert records[f"root-{run}"]["notify"]["exit_status"] == 0  # read once the handler was done: the hook comes last
