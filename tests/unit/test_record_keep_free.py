"""No record past keep_free (issue 30 item 1): on a filesystem already below keep_free a crash writes no
record at all, not even the first one a killed handler would leave, and is counted in the books instead."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from inprocess import collect_in_process
from support import mounted_tmpfs

from corepipe.platform.config import Config
from corepipe.services import collect


def test_no_record_is_written_below_keep_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []
    real_write = collect.write_record
    monkeypatch.setattr(collect, "write_record", lambda ctx: (written.append(ctx.crash.path), real_write(ctx)))
    with mounted_tmpfs(tmp_path / "fs", "4m") as fs:
        cfg = Config(store=str(fs / "store"), backtrace=False, keep_free=64 << 20, rate_limit_exe=0)
        child = subprocess.Popen(["sleep", "30"])
        try:
            with pytest.raises(ValueError):  # no record.json of that crash anywhere: nothing to unpack
                collect_in_process(cfg, child.pid, "nofree", b"\x7fELF" + b"\0" * 100_000)
        finally:
            child.kill()
            child.wait()
        assert written == []
        assert list((fs / "store").rglob("record.json")) == []
        state = json.loads((fs / "store" / ".state.json").read_text())
        assert sum(c.get("records_dropped", 0) for c in state["counters"].values()) == 1, state
