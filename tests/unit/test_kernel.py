from __future__ import annotations

import pytest

from corepipe.platform import capture
from corepipe.platform.kernel import (
    PATTERN_MAX,
    RLIM_INFINITY,
    SPECIFIERS,
    PatternTooLong,
    build_pattern,
    is_corepipe_pattern,
    parse_args,
)

GOOD = ["4242", "1", "4243", "1000", "1001", "11", "1700000000", str(RLIM_INFINITY), "1", "3", "web-1", "my prog"]


def test_parses_the_documented_order() -> None:
    args = parse_args(["--config", "/etc/x.toml", *GOOD])
    assert args.errors == []
    assert (args.pid, args.ns_pid, args.tid, args.uid, args.gid) == (4242, 1, 4243, 1000, 1001)
    assert (args.signal, args.time, args.dump_mode, args.pidfd) == (11, 1700000000, 1, 3)
    assert args.core_limit == RLIM_INFINITY and args.core_limit_bytes() is None
    assert args.hostname == "web-1" and args.comm == "my prog"
    assert args.config == "/etc/x.toml"


@pytest.mark.parametrize("pidfd", ["", "-"])
def test_pidfd_missing_is_not_an_error(pidfd: str) -> None:
    argv = list(GOOD)
    argv[9] = pidfd
    args = parse_args(argv)
    assert args.errors == [] and args.pidfd is None


def test_core_limit_bytes() -> None:
    argv = list(GOOD)
    argv[7] = "0"
    assert parse_args(argv).core_limit_bytes() == 0
    argv[7] = "65536"
    assert parse_args(argv).core_limit_bytes() == 65536


def test_wrong_count_keeps_only_a_leading_pid() -> None:
    args = parse_args(["4242", "1", "x"])
    assert args.pid == 4242 and args.ns_pid is None and args.signal is None
    assert "expected 12 kernel arguments" in args.errors[0]
    assert parse_args([]).pid is None


@pytest.mark.parametrize("index,value", [(0, "-5"), (0, "12a"), (5, ""), (6, "1" * 30), (3, "١٢")])
def test_malformed_numbers_are_reported(index: int, value: str) -> None:
    argv = list(GOOD)
    argv[index] = value
    args = parse_args(argv)
    assert len(args.errors) == 1 and "bad" in args.errors[0]


def test_pattern_has_every_specifier_and_fits() -> None:
    pattern = build_pattern("/usr/local/bin/corepipe")
    assert pattern.startswith("|/usr/local/bin/corepipe collect ")
    assert pattern.split()[2:] == list(SPECIFIERS)
    assert len(pattern) <= PATTERN_MAX
    assert build_pattern("/usr/local/bin/corepipe", pidfd=False).split()[11] == "-"


def test_pattern_too_long_is_refused_not_truncated() -> None:
    with pytest.raises(PatternTooLong):
        build_pattern("/usr/local/bin/corepipe", config="/" + "x" * 80)
    with pytest.raises(ValueError):
        build_pattern("/usr/local/bin/core pipe")


@pytest.mark.parametrize("argv", [
    ["10", "1", "1", "0", "0", "11", "1700000000", "0", "1", "7", "h", "c"],
    ["--config", "/c.toml", "10", "1", "1", "0", "0", "11", "1700000000", "0", "1", "-", "h", "c"],
    ["10", "x"], ["--config"], [],
])
def test_capture_reads_pid_and_pidfd_as_parse_args_does(argv: list) -> None:
    args = parse_args(argv)
    assert capture.kernel_ids(argv) == (args.pid, args.pidfd)


def test_our_pattern_is_recognised() -> None:
    assert is_corepipe_pattern(build_pattern("/usr/local/bin/corepipe", "/etc/c.toml"))
    assert is_corepipe_pattern(build_pattern("/x/h", pidfd=False))
    assert not is_corepipe_pattern("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h")
