"""A process SIGKILLed while the kernel is still writing its core, read back through every command.

The kernel stops the dump and the pipe ends early; the handler keeps what came as core.partial.zst
(the record's ``core.file``), and every reader starts from that name: list and info say ``partial``,
extract writes it, debug opens it in gdb, and the backtrace taken at collection read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from support import core_digest, corepipe_cli, installed_handler, need_tool, short_tempdir, start_crash, wait_for


def test_core_cut_short_by_sigkill_lists_extracts_debugs(crasher: Path, tmp_path: Path) -> None:
    need_tool("gdb")
    workdir = short_tempdir()
    workdir.chmod(0o755)
    try:
        with installed_handler(workdir, "backtrace_max_core_size = 2147483648\n") as handler:
            proc = start_crash([str(crasher), "400", "cutshort"])
            # The handler has written the preliminary record and opened its temporary core: it is reading.
            wait_for(lambda: list(handler.store.rglob(".core.zst.*.tmp")), what="the handler's temporary core")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            rec = handler.wait_record(lambda r: r["comm"] == "cutshort", timeout=120)
        core = rec["core"]
        assert core["stored"] and core["file"] == "core.partial.zst" and core["complete"] is False
        assert 0 < core["size"] < 400 << 20
        crash_dir = Path(rec["_dir"])
        assert sorted(p.name for p in crash_dir.iterdir()) == ["core.partial.zst", "record.json"]

        listed = corepipe_cli(handler.config, "list").stdout.splitlines()
        [row] = [line.split("\t") for line in listed[1:] if line.startswith(rec["id"])]
        assert row[-1] == "partial", listed
        info = corepipe_cli(handler.config, "info", rec["id"]).stdout
        assert any(line.split() == ["core:", "partial"] for line in info.splitlines()), info

        out = tmp_path / "core"
        corepipe_cli(handler.config, "extract", rec["id"], "-o", str(out))
        data = out.read_bytes()
        assert data[:4] == b"\x7fELF" and len(data) == core["size"]
        assert core_digest(data) == core["digest"]

        debug = corepipe_cli(handler.config, "debug", rec["id"], "--", "-batch", "-ex", "bt")
        assert " main " in debug.stdout and "crasher.c" in debug.stdout, debug.stdout + debug.stderr

        trace = rec["backtrace"]
        assert trace["tool"] == "gdb" and trace["error"] is None, trace
        assert " main " in trace["text"], trace["text"]
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
