"""The time grammar of ``--since`` and ``--until`` (commands/times.py), table-driven against a fixed now."""

from __future__ import annotations

import argparse
import calendar
import time

import pytest

from corepipe.commands.times import DAY, parse_time

NOW = float(calendar.timegm((2026, 11, 27, 9, 24, 57)))  # 2026-11-27T09:24:57Z, a Friday
MIDNIGHT = float(calendar.timegm((2026, 11, 27, 0, 0, 0)))
HOUR = 3600


@pytest.mark.parametrize("text, expected", [
    ("now", NOW),
    (" now ", NOW),
    ("today", MIDNIGHT),
    ("yesterday", MIDNIGHT - DAY),
    ("Yesterday", MIDNIGHT - DAY),
    ("tomorrow", MIDNIGHT + DAY),
    ("-1h", NOW - HOUR),
    ("+1h", NOW + HOUR),
    ("2 hours ago", NOW - 2 * HOUR),
    ("1h left", NOW + HOUR),
    ("1h30m", NOW - 1.5 * HOUR),  # a bare span is an age, as corepipe always read it
    ("30m", NOW - 1800),
    ("-1h 30min", NOW - 1.5 * HOUR),
    ("1 hour 30 minutes ago", NOW - 1.5 * HOUR),
    ("90s", NOW - 90),
    ("1.5d", NOW - 1.5 * DAY),
    ("2 weeks ago", NOW - 14 * DAY),
    ("1M", NOW - 2_629_800),  # systemd's month (30.44 days); m is a minute
    ("1y", NOW - 31_557_600),
    ("2 months ago", NOW - 2 * 2_629_800),
    ("1min", NOW - 60),
    ("@1700000000", 1_700_000_000.0),
    ("@1700000000.5", 1_700_000_000.5),
    ("2026-11-27", MIDNIGHT),
    ("2026-11-27T09:24", NOW - 57),
    ("2026-11-27 09:24:57", NOW),  # no zone: UTC, as list prints times
    ("2026-11-27T09:24:57Z", NOW),
    ("2026-11-27T11:24:57+02:00", NOW),
    ("2026-11-27T04:24:57-05:00", NOW),
    ("20261127T092457", NOW),
    ("2026-11-27T09:24:57.250Z", NOW + 0.25),
])
def test_accepted(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == pytest.approx(expected, rel=0, abs=1e-6)


@pytest.mark.parametrize("text", ["", "yesterday-ish", "1x", "h", "1h30", "--1h", "+-1h", "1 hour ago ago",
                                  "2 hours from now", "ago", "2026-13-01", "2026-11-27T25:00", "@", "@-5", "@1e9",
                                  "last tuesday", "1hour30"])
def test_rejected_with_the_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parse_time(text, now=NOW)
    message = str(caught.value)
    assert repr(text) in message and "@EPOCH" in message and "2 hours ago" in message and "\n" not in message


def test_no_zone_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "EST+5")  # a POSIX zone: no tzdata needed
    time.tzset()
    try:
        assert parse_time("2026-11-27 09:24:57", now=NOW) == NOW and parse_time("today", now=NOW) == MIDNIGHT
    finally:
        monkeypatch.undo()
        time.tzset()
