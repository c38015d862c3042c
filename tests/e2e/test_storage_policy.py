"""The storage policy, rate limits and `corepipe prune`, through the real kernel."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cgroups import StandIns, crash_in
from support import HERE, NO_RATE_LIMIT, crash, installed_handler, mounted_tmpfs, need_tool


def _cores(store: Path) -> list:
    return sorted(p for p in store.rglob("core*.zst"))


def test_container_max_cores_deletes_the_oldest_core_and_keeps_its_record(handler_dir: Path, crasher: Path) -> None:
    with installed_handler(handler_dir, "container_max_cores = 2\n" + NO_RATE_LIMIT) as handler:
        for i in range(3):
            crash([str(crasher), "0", f"keep{i}"])
            handler.wait_record(lambda r, i=i: r["comm"] == f"keep{i}")
    recs = {r["comm"]: r for r in handler.records()}
    assert len(recs) == 3
    first = recs["keep0"]["core"]
    assert first["stored"] is False and first["file"] is None and first["digest"]
    # A host process outside any system unit counts under its uid (here root's).
    assert first["reason"].startswith(f"deleted: container uid/{os.getuid()} is over container_max_cores (2)")
    assert recs["keep2"]["id"] in first["reason"]
    assert not (Path(recs["keep0"]["_dir"]) / "core.zst").exists()
    assert (Path(recs["keep0"]["_dir"]) / "record.json").exists()
    for name in ("keep1", "keep2"):
        assert recs[name]["core"]["stored"] and (Path(recs[name]["_dir"]) / "core.zst").exists()


def test_room_is_made_from_the_oldest_cores_of_the_biggest_container(handler_dir: Path, crasher: Path,
                                                                    stand_ins: StandIns) -> None:
    big, small = stand_ins.new(), stand_ins.new()
    max_use = 6 << 20
    with mounted_tmpfs(handler_dir / "store", "64m"), \
            installed_handler(handler_dir, f"max_use = {max_use}\nkeep_free = 0\n" + NO_RATE_LIMIT) as handler:
        crash_in(stand_ins, small, [str(crasher), "0", "small-old"])
        handler.wait_record(lambda r: r["comm"] == "small-old")
        for i in range(5):
            crash_in(stand_ins, big, [str(crasher), "4", f"big{i}"])
            handler.wait_record(lambda r, i=i: r["comm"] == f"big{i}")
        crash_in(stand_ins, small, [str(crasher), "4", "small-new"])
        new = handler.wait_record(lambda r: r["comm"] == "small-new")
        recs = {r["comm"]: r for r in handler.records()}
        used = sum(p.stat().st_blocks * 512 for p in _cores(handler.store))
    assert new["core"]["stored"] is True and new["status"] == "complete"
    assert recs["small-old"]["core"]["stored"] is True, "the smaller container's core was taken"
    stored = [recs[f"big{i}"]["core"]["stored"] for i in range(5)]
    # Some of the biggest container's cores went, oldest first, each saying why and for which crash.
    assert stored[0] is False and stored[-1] is True and stored == sorted(stored), stored
    later = {r["id"] for r in recs.values()}
    for i in range(stored.count(False)):
        reason = recs[f"big{i}"]["core"]["reason"]
        assert "over max_use" in reason and f"runc/{big} uses the most" in reason, reason
        assert reason.rsplit("room for crash ", 1)[1].rstrip(")") in later - {recs[f"big{i}"]["id"]}
    assert used <= max_use


def test_max_core_size_truncates_and_says_so(kernel_handler, handler_dir: Path, crasher: Path) -> None:
    kernel_handler.config.write_text(kernel_handler.config.read_text() + "max_core_size = 100000\n")
    crash([str(crasher), "2", "capped"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "capped")
    assert rec["core"]["stored"] and rec["core"]["truncated"] and rec["core"]["size"] == 100000
    assert rec["core"]["reason"] == "truncated at max_core_size (100000 bytes)"


def test_crash_loop_is_rate_limited_per_executable_and_container(handler_dir: Path, crasher: Path,
                                                                 stand_ins: StandIns) -> None:
    looping, other = stand_ins.new(), stand_ins.new()
    crasher2 = handler_dir / "crasher2"
    shutil.copy2(crasher, crasher2)
    config = "rate_limit_container = 3\nrate_limit_exe = 2\nrate_limit_window = 3600\n"
    with installed_handler(handler_dir, config) as handler:
        for i, exe in enumerate([crasher, crasher, crasher, crasher2, crasher2]):
            crash_in(stand_ins, looping, [str(exe), "0", f"loop{i}"])
            handler.wait_record(lambda r, i=i: r["comm"] == f"loop{i}")
        crash_in(stand_ins, other, [str(crasher), "0", "other"])
        handler.wait_record(lambda r: r["comm"] == "other")
    recs = {r["comm"]: r for r in handler.records()}
    assert len(recs) == 6, "every crash gets a record"
    assert [recs[f"loop{i}"]["core"]["stored"] for i in range(5)] == [True, True, False, True, False]
    assert recs["loop2"]["core"]["reason"].startswith("rate limited: 2 cores of this executable")
    assert recs["loop4"]["core"]["reason"].startswith("rate limited: 3 cores of this container")
    assert all(recs[f"loop{i}"]["status"] == "complete" for i in range(5))
    assert recs["other"]["core"]["stored"] is True, "a crash loop in one container blocked another"
    assert len(_cores(handler.store)) == 4


def _prune(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corepipe", "--config", str(config), "prune", *args],
                          capture_output=True, text=True, timeout=60)


def _tree(root: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prune_dry_run_then_prune(handler_dir: Path, crasher: Path) -> None:
    with installed_handler(handler_dir, NO_RATE_LIMIT) as handler:
        for i in range(4):
            crash([str(crasher), "0", f"p{i}"], core_limit=0 if i == 1 else resource.RLIM_INFINITY)
            handler.wait_record(lambda r, i=i: r["comm"] == f"p{i}")
        handler.wait_idle()
    recs = {r["comm"]: r for r in handler.records()}
    three_days_ago = time.time() - 3 * 86400
    os.utime(Path(recs["p0"]["_dir"]) / "core.zst", (three_days_ago, three_days_ago))
    old_name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(three_days_ago)) + "-" + recs["p1"]["id"]
    old_dir = Path(recs["p1"]["_dir"]).with_name(old_name)
    os.rename(recs["p1"]["_dir"], old_dir)
    stale = Path(recs["p3"]["_dir"]) / ".core.zst.0123abcd.tmp"
    stale.write_bytes(b"half a core")
    os.utime(stale, (three_days_ago, three_days_ago))
    handler.config.write_text(handler.config.read_text() + "max_age_days = 1\ncontainer_max_cores = 1\n")

    before = _tree(handler.store)
    dry = _prune(handler.config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _tree(handler.store) == before, "--dry-run changed the store"
    lines = dry.stdout.splitlines()
    assert all(line.startswith("would delete ") for line in lines) and len(lines) == 4, lines

    real = _prune(handler.config)
    assert real.returncode == 0, real.stderr
    assert [line.replace("deleted ", "would delete ", 1) for line in real.stdout.splitlines()] == lines
    assert not Path(recs["p0"]["_dir"]).exists() and not old_dir.exists(), "old crashes not deleted"
    assert not stale.exists()
    p2 = json.loads((Path(recs["p2"]["_dir"]) / "record.json").read_text())
    assert p2["core"]["stored"] is False and "container_max_cores" in p2["core"]["reason"]
    assert "corepipe prune" in p2["core"]["reason"]
    assert (Path(recs["p3"]["_dir"]) / "core.zst").exists()
    assert _prune(handler.config).stdout == "", "a second prune found more to do"


def test_prune_without_a_store_or_with_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{tmp_path}/none"\n')
    run = _prune(config)
    assert run.returncode == 0 and "does not exist" in run.stdout
    config.write_text("max_use = 'lots'\n")
    run = _prune(config)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "max_use must be int" in run.stderr


def test_systemd_units_run_prune_daily() -> None:
    units = HERE.parent / "install" / "systemd"
    service = (units / "corepipe-prune.service").read_text()
    timer = (units / "corepipe-prune.timer").read_text()
    assert "ExecStart=/usr/local/bin/corepipe prune\n" in service and "Type=oneshot" in service
    assert "OnUnitActiveSec=1d" in timer and "WantedBy=timers.target" in timer
    analyze = need_tool("systemd-analyze")
    check = subprocess.run([analyze, "verify", "--man=no", str(units / "corepipe-prune.timer"),
                            str(units / "corepipe-prune.service")], capture_output=True, text=True)
    problems = [line for line in check.stderr.splitlines() if "corepipe" in line and "/usr/local/bin" not in line]
    assert not problems, check.stderr
