"""A record flood through the real kernel (issue 30, item 1): an unprivileged user's crashes with big records
(hundreds of mapped files with long, control-character names, a long command line) into a small store must
neither delete root's cores nor take more than their group's records budget; prune ages them out."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import urllib.request
from pathlib import Path

from support import corepipe_cli, crash, installed_handler, set_core_limit, wait_for

from corepipe.domain import books, ledger
from corepipe.domain import record as records
from corepipe.platform.store import CORE, LEDGER, STATE, Store, read_file

NOBODY = 65534
MIB = 1 << 20
BUDGET = 32 << 10  # records_max_use: four small records per group
FLOOD = 10
MAPPED = 300

#: Run as uid 65534: map MAPPED files with long, control-character names, then crash (SIGSEGV, dumped).
FLOODER = r"""
import mmap, os, signal, sys
where, count = sys.argv[1], int(sys.argv[2])
held = []
for i in range(count):
    name = os.path.join(where, f"{i:04d}" + "\x1b[31m\n\t" * 12 + "L" * 150)
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    held.append(mmap.mmap(fd, 4096))
    os.close(fd)
os.kill(os.getpid(), signal.SIGSEGV)
"""


def _as_nobody() -> None:
    set_core_limit(resource.RLIM_INFINITY)()
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _state(store: Path) -> dict:
    return json.loads((store / STATE).read_text())


def _ledger_right(store: Path) -> None:
    """The ledger on disk is what a scan of the store says (cores, binaries and every group's records)."""
    def comparable(held: ledger.Ledger) -> tuple:
        return ({(c.group, c.crash): c.size for g in held.groups() for c in held.cores(g)}, held.binaries,
                held.records)

    with Store(str(store), create=False) as opened, books.Books(opened, save=False) as kept:
        on_file = ledger.loads(read_file(opened.fd, LEDGER, 1 << 30), kept.load_group)
        assert on_file is not None and comparable(on_file) == comparable(books.rebuild_ledger(opened))


def _flood_setup(handler_dir: Path, budget: int, binaries: str) -> tuple:
    """(a directory anyone may write, the config's extra lines) of a flood into a 4 MiB store whose groups' records
    may take ``budget`` bytes. The flood's crashes keep no core (as rate-limited ones would not): only their
    records are at stake."""
    flood_dir = handler_dir / "flood"
    flood_dir.mkdir()
    flood_dir.chmod(0o777)
    return flood_dir, (f"max_use = {4 * MIB}\nkeep_free = 0\nrecords_max_use = {budget}\nrate_limit_exe = 0\n"
                       f"rate_limit_container = 0\n{binaries}\nbacktrace = false\n"
                       f'exclude_executables = ["/usr/bin/python3*"]\n')


def _flood_recorded_or_counted(handler, count: int) -> None:  # noqa: ANN001 - support's installed handler
    def done() -> bool:
        recs = [r for r in handler.records() if r["uid"] == NOBODY]
        counted = sum(v.get("records_dropped", 0) for v in _state(handler.store).get("counters", {}).values())
        return all(r["status"] != "collecting" for r in recs) and len(recs) + counted == count

    wait_for(done, 120, "every crash of the flood recorded or counted")


def test_a_record_flood_keeps_roots_cores_and_its_own_budget(handler_dir: Path, crasher: Path) -> None:
    flood_dir, extra = _flood_setup(handler_dir, BUDGET, "binaries_host = true")
    with installed_handler(handler_dir, config_extra=extra) as handler:
        crash([str(crasher), "0", "root-before"])
        before = handler.wait_record(lambda r: r["comm"] == "root-before" and r["status"] != "collecting")
        assert before["core"]["stored"], before["core"]
        for n in range(FLOOD):
            where = flood_dir / str(n)
            where.mkdir()
            os.chown(where, NOBODY, NOBODY)
            subprocess.run(["/usr/bin/python3", "-c", FLOODER, str(where), str(MAPPED), "A" * 60000],
                           preexec_fn=_as_nobody, cwd="/", capture_output=True, timeout=120)
        _flood_recorded_or_counted(handler, FLOOD)
        crash([str(crasher), "0", "root-after"])
        after = handler.wait_record(lambda r: r["comm"] == "root-after" and r["status"] != "collecting")

    assert (Path(before["_dir"]) / CORE).exists(), "a record flood deleted root's core"
    assert after["core"]["stored"], after["core"]
    flood = [r for r in handler.records() if r["uid"] == NOBODY]
    group = str(Path(flood[0]["_dir"]).parent.relative_to(handler.store))
    coreless = [r for r in flood if not r["core"]["stored"]]
    assert coreless and all(r["core"]["reason"] for r in coreless)
    sizes = {r["id"]: (Path(r["_dir"]) / "record.json").stat().st_size for r in coreless}
    assert max(sizes.values()) <= records.CORELESS_MAX, sizes
    for rec in coreless:
        assert rec["binaries"]["files"] == [] and rec["process"]["maps"] is None
        assert len(json.dumps(rec["cmdline"])) < 1024, rec["cmdline"]
    used = sum((Path(r["_dir"]) / "record.json").stat().st_blocks * 512 for r in flood)
    assert used <= BUDGET + 8192, (used, len(flood))  # a record with its core is kept whatever the budget
    dropped = _state(handler.store)["counters"][group]["records_dropped"]
    assert dropped >= FLOOD - BUDGET // 4096 and dropped + len(flood) == FLOOD, (dropped, len(flood))
    _ledger_right(handler.store)

    # prune counts every record: with a budget of one record, the flood's oldest records without a core go.
    handler.config.write_text(handler.config.read_text().replace(f"records_max_use = {BUDGET}",
                                                                 "records_max_use = 8192"))
    pruned = corepipe_cli(handler.config, "prune").stdout
    assert f"the records of {group} are over records_max_use (8192 bytes)" in pruned, pruned
    left = [r for r in handler.records() if r["uid"] == NOBODY]
    assert sum((Path(r["_dir"]) / "record.json").stat().st_blocks * 512 for r in left if not r["core"]["stored"]) \
        <= 8192 or all(r["core"]["stored"] for r in left), left
    assert len(left) < len(flood)
    oldest_kept = min(r["timestamp"] for r in left) if left else None
    assert all(r["timestamp"] <= (oldest_kept or 0) or r["id"] in {x["id"] for x in left} for r in flood)
    assert (Path(before["_dir"]) / CORE).exists() and (Path(after["_dir"]) / CORE).exists()
    _ledger_right(handler.store)


def test_the_dropped_records_show_in_status_and_a_scrape(handler_dir: Path) -> None:
    """Crashes over their group's records budget are counted in the state file: ``status`` (text and --json)
    and the Prometheus endpoint, scraped over HTTP, show that count for the group."""
    flood_dir, extra = _flood_setup(handler_dir, 8192, "binaries = false")
    count = 6
    with installed_handler(handler_dir, config_extra=extra) as handler:
        for _ in range(count):
            subprocess.run(["/usr/bin/python3", "-c", FLOODER, str(flood_dir), "0"], preexec_fn=_as_nobody, cwd="/",
                           capture_output=True, timeout=120)
        _flood_recorded_or_counted(handler, count)
    (group, counts), = _state(handler.store)["counters"].items()
    dropped = counts["records_dropped"]
    assert dropped >= 2, counts
    facts = json.loads(corepipe_cli(handler.config, "status", "--json", check=False).stdout)
    assert facts["store"]["records_dropped"] == {group: dropped}, facts["store"]
    text = corepipe_cli(handler.config, "status", check=False).stdout
    assert f"records dropped (over records_max_use or below keep_free): {dropped} ({group} {dropped})" in text, text
    server = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(handler.config), "metrics",
                               "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"serving (http://\S+)", server.stderr.readline()).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(url, timeout=60) as reply:
            scraped = reply.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert f'corepipe_records_dropped_total{{policy_group="{group}"}} {float(dropped)}' in scraped, scraped
