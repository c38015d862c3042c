"""Records are bounded and count in the store's limits; secrets are masked (issue 14, items 3 and 10)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from test_collect_handler import _args, _collect

from corepipe.domain import books as books_module
from corepipe.domain import catalog, containers, policy, record
from corepipe.domain.books import Books
from corepipe.domain.policy import Core, Limits
from corepipe.domain.snapshot import Snapshot
from corepipe.platform.config import REDACT_ARGS
from corepipe.platform.kernel import parse_args
from corepipe.platform.store import LEDGER, Store

MIB = 1 << 20
WORDS = list(REDACT_ARGS)


def _build(snap: Snapshot, **kwargs: object) -> dict:
    args = parse_args(["1", "1", "1", "0", "0", "11", "1700000000", "0", "1", "-", "h", "c" * 5000])
    return record.build(crash_id="abc123abc123", args=args, snapshot=snap, container=containers.Container(),
                        redact_env=["TOKEN"], **kwargs)  # type: ignore[arg-type]


def test_every_field_is_bounded_by_its_escaped_size_and_cuts_are_marked() -> None:
    control = "\x01" * (1 << 20)  # 6 bytes each once escaped: 6 MiB of JSON from 1 MiB of /proc
    snap = Snapshot(pid=1, files={"maps": control.encode(), "mountinfo": control.encode(),
                                  "environ": ("PATH=" + control + "\0").encode() * 4,
                                  "cmdline": (control + "\0").encode() * 3, "status": b"Name:\t" + control.encode()},
                    exe="/" + "e" * 100_000)
    rec = _build(snap, field_max=64 << 10)
    data = record.dumps(rec)
    assert len(data) < 8 * (64 << 10)
    for field in ("process.maps", "process.mountinfo", "process.environ[0]", "cmdline[0]", "exe", "comm",
                  "process.status.Name"):
        assert field in rec["truncated"], field
    assert len(json.dumps(rec["process"]["maps"])) <= (64 << 10) + 2
    assert record.load(data)["process"]["maps"] == rec["process"]["maps"]


def test_the_whole_record_is_bounded() -> None:
    rec = _build(Snapshot(pid=1, files={"maps": b"m" * 60_000}))
    rec["backtrace"] = {"text": "x" * (3 * MIB)}
    data = record.dumps(rec, max_size=MIB)
    assert len(data) <= MIB
    assert any(t.startswith("backtrace.text (omitted") for t in rec["truncated"])
    assert rec["process"]["maps"] is None  # dropped first


def test_admission_never_deletes_cores_for_records() -> None:
    """Records have a budget of their own per group: 9 MiB of records leave a core's room and cores alone."""
    held = [Core(group="host", crash=f"20260101T00000{n}Z-{n:012x}", size=0, time=float(n), file=None,
                 record=3 * MIB) for n in range(3)]
    held.append(Core(group="root", crash="20260101T000009Z-0000000000ff", size=4 * MIB, time=9.0, file="core.zst"))
    plan = policy.plan(held, Limits(max_use=10 * MIB), fs_free=1 << 40, group="host", want=MIB)
    assert plan.budget == 6 * MIB and plan.delete == []


def test_records_over_their_groups_budget_oldest_coreless_first() -> None:
    crashes = [Core(group="uid/65534", crash=f"c{n}", size=0, time=float(n), file=None, record=8192)
               for n in range(10)]
    crashes += [Core(group="uid/0", crash="root", size=MIB, time=0.0, file="core.zst", record=8192),
                Core(group="uid/65534", crash="cored", size=MIB, time=0.0, file="core.zst", record=8192)]
    over = policy.records_over(crashes, 5 * 8192)
    assert [c.crash for c in over] == [f"c{n}" for n in range(6)]  # 11 records of the group, 5 may stay
    assert policy.records_over(crashes, 0) == []
    assert policy.records_budget(-1, Limits(max_use=3 * MIB)) == 3 * MIB // 10
    assert policy.records_budget(4096, Limits(max_use=3 * MIB)) == 4096


def test_a_rate_limited_crash_is_cheap(tmp_path: Path) -> None:
    """A process with a big environment and many mappings crashes twice; the second is rate limited."""
    env = {"PATH": "/usr/bin:/bin", **{f"V{i}": "\x01" * 4000 for i in range(200)}}
    child = subprocess.Popen(["sleep", "30"], env=env)
    try:
        config = "rate_limit_exe = 1\nbacktrace = false\nbinaries = false\n"
        _collect(tmp_path, _args(child.pid), config_extra=config)
        proc, records = _collect(tmp_path, _args(child.pid), config_extra=config)
    finally:
        child.kill()
        child.wait()
    limited = next(r for r in records if not r["core"]["stored"])
    assert limited["core"]["reason"].startswith("rate limited")
    sizes = [p.stat().st_size for p in (tmp_path / "store").rglob("record.json")]
    assert max(sizes) <= 2 * (64 << 10) + 16384, sizes
    assert min(sizes) < 32 << 10, sizes  # the rate-limited one: no maps, mountinfo, environment
    assert "process.environ (omitted: no core kept)" in limited["truncated"]


def test_records_count_in_the_ledger_and_go_with_their_crash(tmp_path: Path) -> None:
    """The ledger counts every finished record (with or without a core), a rebuild agrees, and deleting a
    crash takes its record off."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        config = "rate_limit_exe = 1\nbacktrace = false\nbinaries = false\n"
        for _ in range(3):
            _collect(tmp_path, _args(child.pid), config_extra=config)
    finally:
        child.kill()
        child.wait()
    store_dir = tmp_path / "store"
    on_disk = [p.stat().st_blocks * 512 for p in store_dir.rglob("record.json")]
    counted = json.loads((store_dir / LEDGER).read_text())["records"]
    assert list(counted.values()) == [[3, sum(on_disk)]]
    with Store(str(store_dir)) as store, Books(store) as books:
        assert books_module.rebuild_ledger(store).records == counted
        group, crash = catalog.group_of(str(next(store_dir.rglob("record.json")).parent), str(store_dir))
        books.delete_crash(group, crash)
    assert list(json.loads((store_dir / LEDGER).read_text())["records"].values())[0][0] == 2


def test_environment_is_kept_by_allow_list() -> None:
    env = ["PATH=/bin", "HOME=/root", "DATABASE_URL=postgres://app:hunter2@db/x", "MYSQL_PWD=hunter2",
           "LC_ALL=C", "SMTP_PASS=hunter2", "API_TOKEN=hunter2", "HTTP_PROXY=http://u:hunter2@proxy:3128",
           "LD_PRELOAD=/x.so", "NOVALUE"]
    kept = record.redact(env, ["TOKEN"], ["PATH", "HOME", "LC_*", "LD_PRELOAD", "API_TOKEN"], WORDS)
    assert kept == ["PATH=/bin", "HOME=/root", "DATABASE_URL=<redacted>", "MYSQL_PWD=<redacted>", "LC_ALL=C",
                    "SMTP_PASS=<redacted>", "API_TOKEN=<redacted>", "HTTP_PROXY=<redacted>",
                    "LD_PRELOAD=/x.so", "NOVALUE"]
    everything = record.redact(env, [], ["*"], WORDS)
    assert "DATABASE_URL=postgres://<redacted>@db/x" in everything and "HTTP_PROXY=http://<redacted>@proxy:3128" \
        in everything
    assert record.redact(env, [], ["*"], []) == env  # configurable down to nothing


def test_credentials_in_the_command_line_are_masked() -> None:
    argv = ["app", "--password=hunter2", "--db-password", "hunter2", "mysql://root:hunter2@db:3306/app",
            "host=db user=app password=hunter2 dbname=x", "--api-key=hunter2",
            "https://ghp_" + "a" * 36 + "@github.com",
            "-H", "Authorization: Bearer hunter2hunter2", "token=hunter2", "xoxb-1234567890-abcdefghij",
            "--verbose", "--sort-key", "name", "/srv/passport/app.conf"]
    masked = record.mask_args(argv, WORDS)
    assert not any("hunter2" in a or "ghp_" in a or "xoxb" in a for a in masked), masked
    assert masked[0] == "app" and masked[12] == "--verbose" and masked[-1] == "/srv/passport/app.conf"
    assert masked[4] == "mysql://<redacted>@db:3306/app" and masked[1] == "--password=<redacted>"
    assert record.mask_args(argv, []) == argv


def test_the_handler_masks_its_own_argv_style_secrets(tmp_path: Path) -> None:
    env = {"PATH": "/bin", "AWS_SECRET": "hunter2", "CUSTOM": "visible"}
    child = subprocess.Popen(["sh", "-c", "sleep 30; :", "sh", "--password=hunter2"], env=env)
    try:
        _proc, [rec] = _collect(tmp_path, _args(child.pid))
        _proc, records = _collect(tmp_path, _args(child.pid), config_extra='env_keep = ["*"]\nredact_args = []\n'
                                  'redact_env = []\nrate_limit_exe = 0\n')
    finally:
        child.kill()
        child.wait()
    assert rec["cmdline"][-1] == "--password=<redacted>"
    assert "AWS_SECRET=<redacted>" in rec["process"]["environ"] and "CUSTOM=<redacted>" in rec["process"]["environ"]
    plain = next(r for r in records if r["id"] != rec["id"])
    assert plain["cmdline"][-1] == "--password=hunter2" and "CUSTOM=visible" in plain["process"]["environ"]
    assert os.path.getsize(next((tmp_path / "store").rglob("record.json"))) < 1 << 20


def test_masking_sees_only_bounded_text(monkeypatch) -> None:
    """Megabytes of arguments and environment: masking is given each value cut near record_field_max and at
    most MAX_ITEMS of them (masking over the whole text made one crash cost minutes)."""
    seen: list = []
    real = record.mask
    monkeypatch.setattr(record, "mask", lambda text, words: seen.append(len(text)) or real(text, words))
    snap = Snapshot(pid=1, files={"cmdline": (b"a" * 300_000 + b"\0") * 3 + b"x\0" * 10_000,
                                  "environ": (b"PATH=" + b"p" * 300_000 + b"\0") * 3})
    rec = _build(snap, field_max=64 << 10)
    assert seen and max(seen) <= (64 << 10) + 1 and len(seen) <= 2 * record.MAX_ITEMS
    assert {"cmdline[0]", "cmdline[1:]", "process.environ[0]"} <= set(rec["truncated"])
