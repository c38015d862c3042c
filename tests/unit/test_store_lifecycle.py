"""Cores, saved binaries and the ledger through real collections (in-process), rm, prune and admission.

Binaries are saved only beside a kept core, count in max_use, and go with the last core that uses
them; the ledger admission reads instead of scanning the store stays exactly what a scan says.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from inprocess import collect_in_process
from support import host_dir, need, wait_for

from corepipe import cli
from corepipe.domain import books as books_module
from corepipe.domain import catalog, ledger
from corepipe.domain.books import Books
from corepipe.platform.config import Config
from corepipe.platform.store import BUILD_ID, LEDGER, Store, read_file

MIB = 1 << 20
CORE = b"\x7fELF" + os.urandom(MIB)  # incompressible: the stored core takes about a MiB


@pytest.fixture
def sleepers() -> list:
    children = [subprocess.Popen(["sleep", "60"]), subprocess.Popen(["tail", "-f", "/dev/null"])]
    for child in children:  # every library mapped (the loader done) before a crash of it is collected
        wait_for(lambda c=child: "libc" in Path(f"/proc/{c.pid}/maps").read_text() and
                 Path(f"/proc/{c.pid}/wchan").read_text() not in ("", "0"), 10, "the process to start")
    yield children
    for child in children:
        child.kill()
        child.wait()


def _host_group(tmp_path: Path) -> str:
    """The ledger's name for the group this test's own (host) processes crash in."""
    return host_dir(tmp_path / "store").relative_to(tmp_path / "store").as_posix()


def _cfg(tmp_path: Path, **kw) -> Config:
    settings = {"store": str(tmp_path / "store"), "backtrace": False, "binaries_host": True, "max_use": 0,
                "keep_free": 0, "rate_limit_container": 0, "rate_limit_exe": 0, "container_max_cores": 0}
    return Config(**{**settings, **kw})


def _saved(tmp_path: Path) -> set:
    area = tmp_path / "store" / BUILD_ID
    return {str(p.relative_to(area)) for p in area.rglob("*") if p.is_file()} if area.exists() else set()


def _stored_keys(rec: dict) -> set:
    return {f"{e['build_id'][:2]}/{e['build_id'][2:]}-{e['sha256'][:16]}" for e in rec["binaries"]["files"]
            if e["stored"]}


def _comparable(books: ledger.Ledger) -> tuple:
    """The ledger without the times (a scan takes a core's mtime, the handler the time it stored it)."""
    return ({(c.group, c.crash): (c.file, c.size, sorted(c.binaries)) for g in books.groups() for c in books.cores(g)},
            books.groups(), books.binaries)


def _assert_exact(tmp_path: Path) -> None:
    """The ledger on disk (summary and group files) is what a scan of the store says."""
    with Store(str(tmp_path / "store"), create=False) as store, Books(store) as books:
        on_file = ledger.loads(read_file(store.fd, LEDGER, 1 << 30), books.load_group)
        assert on_file is not None, "no ledger"
        assert _comparable(on_file) == _comparable(books_module.rebuild_ledger(store))


def _cli(tmp_path: Path, cfg: Config, *args: str) -> int:
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{cfg.store}"\nmax_use = {cfg.max_use}\nkeep_free = 0\n'
                      f'max_age_days = {cfg.max_age_days}\nrecords_max_use = {cfg.records_max_use}\n')
    return cli.main(["--config", str(config), *args])


def test_binaries_are_saved_only_beside_a_kept_core(tmp_path: Path, sleepers: list) -> None:
    cfg = _cfg(tmp_path, rate_limit_exe=1)
    _code, _, kept = collect_in_process(cfg, sleepers[0].pid, "kept", CORE)
    _code, _, limited = collect_in_process(cfg, sleepers[0].pid, "limited", CORE)
    assert kept["core"]["stored"] and _stored_keys(kept), kept["binaries"]
    assert not limited["core"]["stored"] and limited["core"]["reason"].startswith("rate limited")
    # A record without a core lists no binaries (it stays a few KiB: record.coreless).
    assert limited["binaries"]["files"] == [] and "binaries.files (omitted: no core kept)" in limited["truncated"]
    assert _saved(tmp_path) == _stored_keys(kept)
    _assert_exact(tmp_path)


def test_binaries_count_in_max_use(tmp_path: Path, sleepers: list) -> None:
    need(os.geteuid() == 0, "needs root: the libraries are saved through map_files")
    _code, _, first = collect_in_process(_cfg(tmp_path), sleepers[0].pid, "first", CORE)
    core_bytes = (first["_dir"] / first["core"]["file"]).stat().st_blocks * 512
    binary_bytes = sum((tmp_path / "store" / BUILD_ID / k).stat().st_blocks * 512 for k in _stored_keys(first))
    assert binary_bytes > MIB, "the test needs binaries bigger than the room it leaves"
    # Room for the first core and a second (a MiB is reserved first), but not for the binaries as well.
    cfg = _cfg(tmp_path, max_use=core_bytes + MIB + binary_bytes // 2)
    _code, _, second = collect_in_process(cfg, sleepers[1].pid, "second", CORE)
    assert second["core"]["stored"]
    [first_now] = [rec for _path, rec in catalog.iter_records(cfg.store) if rec["id"] == first["id"]]
    assert not first_now["core"]["stored"] and "over max_use" in first_now["core"]["reason"], first_now["core"]
    assert not any(e["stored"] for e in first_now["binaries"]["files"])
    assert _saved(tmp_path) == _stored_keys(second)  # the first core's binaries went with it, unless shared
    _assert_exact(tmp_path)


def test_binaries_go_with_the_last_crash_that_uses_them(tmp_path: Path, sleepers: list) -> None:
    cfg = _cfg(tmp_path)
    _code, _, a = collect_in_process(cfg, sleepers[0].pid, "a", CORE)
    _code, _, b = collect_in_process(cfg, sleepers[0].pid, "b", CORE)
    _code, _, c = collect_in_process(cfg, sleepers[1].pid, "c", CORE)
    assert _stored_keys(a) == _stored_keys(b) and _saved(tmp_path) == _stored_keys(a) | _stored_keys(c)
    assert _cli(tmp_path, cfg, "rm", a["id"]) == 0
    assert _saved(tmp_path) == _stored_keys(b) | _stored_keys(c), "b still uses them"
    _assert_exact(tmp_path)
    assert _cli(tmp_path, cfg, "rm", b["id"]) == 0
    assert _saved(tmp_path) == _stored_keys(c)
    _assert_exact(tmp_path)
    # prune: c's core dates from 1970 (a crash's age is its core's), older than max_age_days: c goes, and its
    # binaries with it.
    os.utime(c["_dir"] / c["core"]["file"], (1, 1))
    assert _cli(tmp_path, cfg, "prune") == 0
    assert _saved(tmp_path) == set() and list(catalog.iter_records(cfg.store)) == []
    _assert_exact(tmp_path)


def test_the_ledger_stays_exact_and_is_rebuilt_when_damaged(tmp_path: Path, sleepers: list) -> None:
    cfg = _cfg(tmp_path, container_max_cores=2)
    for n in range(3):  # the third makes room by deleting the first core (container_max_cores)
        collect_in_process(cfg, sleepers[n % 2].pid, f"crash{n}", CORE)
        _assert_exact(tmp_path)
    with Store(cfg.store, create=False) as store:
        groups = ledger.loads(read_file(store.fd, LEDGER, 1 << 30)).groups()
    assert groups == {_host_group(tmp_path): [2, pytest.approx(2 * MIB, rel=0.1)]}
    for damage in (None, b"not json", b'{"schema": 2, "groups": [], "binaries": {}}'):
        path = tmp_path / "store" / LEDGER
        path.unlink()
        if damage is not None:
            path.write_bytes(damage)
        collect_in_process(cfg, sleepers[0].pid, f"after-{damage!r}"[:15], CORE)
        _assert_exact(tmp_path)
    assert _cli(tmp_path, cfg, "prune", "--dry-run") == 0
    _assert_exact(tmp_path)


def test_a_ledger_that_cannot_be_saved_is_rebuilt_next_time(tmp_path: Path, sleepers: list) -> None:
    cfg = _cfg(tmp_path)
    collect_in_process(cfg, sleepers[0].pid, "first", CORE)
    with Store(cfg.store, create=False) as store, Books(store) as books:
        books.ledger.dirty.add(_host_group(tmp_path))
        (host_dir(tmp_path / "store") / ".cores.json").unlink()
        (host_dir(tmp_path / "store") / ".cores.json").mkdir()  # the group file cannot be replaced now
    assert not (tmp_path / "store" / LEDGER).exists()
    (host_dir(tmp_path / "store") / ".cores.json").rmdir()
    collect_in_process(cfg, sleepers[0].pid, "second", CORE)
    _assert_exact(tmp_path)


def test_storing_a_crash_never_scans_the_store(tmp_path: Path, sleepers: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 11: once the ledger exists, admission and the final record read it, never the crash directories
    (a scan made each stored core cost in proportion to the store; tests/bench/bench_store.py measures it)."""
    cfg = _cfg(tmp_path)
    collect_in_process(cfg, sleepers[0].pid, "first", CORE)

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store was scanned while storing a crash")

    monkeypatch.setattr(catalog, "crash_dirs", no_scan)
    code, _fd_state, rec = collect_in_process(cfg, sleepers[1].pid, "second", CORE)
    assert code == 0 and rec["core"]["stored"] is True and rec["status"] == "complete", rec["collector"]["errors"]
    monkeypatch.undo()
    _assert_exact(tmp_path)


def test_prune_deletes_the_oldest_records_when_records_alone_are_over_max_use(tmp_path: Path, sleepers: list) -> None:
    """A rate-limited crash loop leaves records only; once they alone exceed max_use, prune deletes the oldest
    crashes (the core goes first), so records cannot grow past the limit until max_age_days (with no per-group
    budget: records_max_use = 0)."""
    cfg = _cfg(tmp_path, rate_limit_exe=1, records_max_use=0)
    order = []  # the crash directories, oldest first
    for n in range(6):
        rec = collect_in_process(cfg, sleepers[0].pid, f"loop{n}", CORE, when=1700000000 + n)[2]
        order.append(rec["_dir"].name)
    with Store(cfg.store, create=False) as store:
        crashes = catalog.scan(store).crashes
    assert len(crashes) == 6 and sum(1 for c in crashes if c.file) == 1
    assert sorted(c.crash for c in crashes) == sorted(order), (order, crashes)
    newest = sorted(c.record for c in crashes)[:2]
    limit = sum(newest)  # room for the two smallest records: at least four crashes must go
    # max_age_days = 0: the records' dump time (collect_in_process's, in 2023) must not expire them first.
    assert _cli(tmp_path, _cfg(tmp_path, max_use=limit, max_age_days=0, records_max_use=0), "prune") == 0
    with Store(cfg.store, create=False) as store:
        left = catalog.scan(store).crashes
    # The core went first (its record then says so, and may grow by a block); then the oldest records.
    assert 1 <= len(left) <= 2 and not any(c.file for c in left), left
    assert sorted(c.crash for c in left) == sorted(order[-len(left):]), (order, left)  # the newest are kept
    _assert_exact(tmp_path)


def test_a_record_rewritten_for_the_notify_hook_is_counted_once(tmp_path: Path, sleepers: list) -> None:
    """The hook's outcome is written into the final record afterwards: the ledger keeps one record of its final
    size, as a scan of the store says."""
    need(os.geteuid() == 0, "needs root: the hook runs as a uid of its own")
    cfg = _cfg(tmp_path, notify_command=["/bin/true"])
    _code, _, rec = collect_in_process(cfg, sleepers[0].pid, "notified", CORE)
    assert rec["notify"]["exit_status"] == 0, rec["notify"]
    with Store(cfg.store, create=False) as store, Books(store) as books:
        assert books.ledger.records == books_module.rebuild_ledger(store).records
