"""``list``'s coredumpctl habits (-1, -r/--reverse, --no-legend), its time grammar end to end, and its usage
errors: one line, exit 2 (issue 31)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_crash_commands import add_crash, cli, listed
from test_output import corepipe

from corepipe.domain.containers import Container


@pytest.fixture
def recent(tmp_path: Path) -> list:
    """Three crashes of the last hours: 3 h, 30 min and 10 min ago (oldest first), as comms."""
    root = tmp_path / "store"
    (tmp_path / "c.toml").write_text(f'store = "{root}"\n')
    now = int(time.time())
    for comm, age, signal in (("old", 3 * 3600, 11), ("mid", 1800, 6), ("new", 600, 11)):
        add_crash(root, container=Container(runtime="host"), when=now - age, comm=comm, signal=signal, tmp=tmp_path)
    return ["old", "mid", "new"]


@pytest.mark.parametrize("args, comms", [
    (["--since", "2 hours ago"], ["mid", "new"]),
    (["--since", "-1h", "--until", "15 minutes ago"], ["mid"]),
    (["--since", "1h30m"], ["mid", "new"]),
    (["--since", "yesterday"], ["old", "mid", "new"]),
    (["--since", "now"], []),
    (["--until", "-4h"], []),
    (["--until", "+1h"], ["old", "mid", "new"]),
    (["-1"], ["new"]),
    (["-r"], ["new", "mid", "old"]),
    (["--reverse", "-n", "2"], ["new", "mid"]),
    (["-1", "--reverse"], ["new"]),
    (["--signal", "segv", "-1"], ["new"]),
    (["--signal", "SIGIOT"], ["mid"]),  # an alias of SIGABRT, as the record names it
])
def test_filters_and_order(recent: list, tmp_path: Path, capsys: pytest.CaptureFixture, args: list,
                           comms: list) -> None:
    assert listed(tmp_path, capsys, *args) == comms


def test_no_legend_drops_the_header_only(recent: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _err = cli(tmp_path, capsys, "list", "--no-legend", "-r")
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [row[6] for row in rows] == ["new", "mid", "old"]
    code, out, _err = cli(tmp_path, capsys, "list", "--group", "--no-legend")
    assert code == 0 and not out.startswith("HASH") and len(out.splitlines()) == 1  # add_crash writes no signature


@pytest.mark.parametrize("args, says", [
    (["-n", "0"], "'0' is not a number of crashes"),
    (["-n", "-1"], "argument -n"),
    (["-n", "2", "-1"], "not allowed with argument -n"),
    (["--signal", "BOGUS"], "'BOGUS' is not a signal"),
    (["--signal", "99"], "'99' is not a signal"),
    (["--since", "yesterday-ish"], "use 2026-11-27"),
    (["--until", "2 hours from now"], "'2 hours ago'"),
])
def test_usage_errors_are_one_line_and_exit_2(recent: list, tmp_path: Path, args: list, says: str) -> None:
    proc = corepipe(tmp_path, "list", *args)
    assert proc.returncode == 2 and proc.stdout == b""
    [line] = proc.stderr.decode().splitlines()
    assert line.startswith("corepipe list: error: ") and says in line and line.endswith("(see 'corepipe list --help')")


def test_a_long_option_takes_a_value_that_starts_with_a_dash(recent: list, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """As getopt: ``--container -x`` looks for a container named -x (none), where argparse alone would fail."""
    code, out, err = cli(tmp_path, capsys, "list", "--container", "-x")
    assert code == 0 and out == "" and err == "no crashes match\n"
