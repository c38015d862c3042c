"""The times ``--since`` and ``--until`` take: the forms journalctl and coredumpctl accept (systemd.time(7)).

- ISO 8601, read by python-dateutil's ``isoparse``: ``2026-11-27``, ``2026-11-27T09:24[:57[.5]]`` (a space
  for the T too), ``20261127T092457``, with a zone (``Z``, ``+02:00``) or without one: then UTC, as ``list``
  prints times (journalctl would take local time; on a host kept in UTC it is the same).
- ``@EPOCH``: seconds since 1970.
- ``now``, ``today``, ``yesterday``, ``tomorrow``: now, and midnight (UTC) of those days.
- A time span in systemd's units (``1h30m``, ``2 hours``, ``90s``, ``1.5d``) before or after now: ``-1h`` and
  ``2 hours ago`` are the past, ``+1h`` and ``1h left`` the future, and a bare span (``30m``) is an age
  (the past), as corepipe has always read it.

dateutil is imported only when a time is read: never on the kernel's path.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Optional

DAY = 86400
#: systemd.time(7)'s time span units, in seconds (a month is 30.44 days, a year 365.25, as systemd counts).
UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": DAY, "day": DAY, "days": DAY,
    "w": 7 * DAY, "week": 7 * DAY, "weeks": 7 * DAY,
    "M": 2_629_800, "month": 2_629_800, "months": 2_629_800,
    "y": 31_557_600, "year": 31_557_600, "years": 31_557_600,
}
#: The named days, as days from today.
DAYS = {"today": 0, "yesterday": -1, "tomorrow": 1}
#: A number and a unit; the longest unit is tried first (``min`` before ``m``, ``months`` before ``M``).
_TERM = rf"(\d+(?:\.\d+)?)\s*({'|'.join(sorted(UNITS, key=len, reverse=True))})"
_SPAN = re.compile(rf"(?:\s*{_TERM})+\s*")
_TERMS = re.compile(_TERM)
_EPOCH = re.compile(r"@\d+(?:\.\d+)?")
FORMS = ("2026-11-27, 2026-11-27T09:24[:57][Z|+02:00] (UTC without a zone), @EPOCH, now, today, yesterday, "
         "-1h, +1h, '2 hours ago', '1h left', or an age such as 30m or 1h30m")


def span(text: str) -> Optional[float]:
    """Seconds in a systemd time span (``1h30m``, ``2 hours``); None if ``text`` is not one."""
    if not _SPAN.fullmatch(text):
        return None
    return sum(float(number) * UNITS[unit] for number, unit in _TERMS.findall(text))


def parse_time(text: str, now: Optional[float] = None) -> float:
    """Epoch seconds from any of the forms in the module's text; ArgumentTypeError naming them otherwise."""
    now = time.time() if now is None else now
    value = text.strip()
    word = value.lower()
    if word == "now":
        return now
    if word in DAYS:
        return (now // DAY + DAYS[word]) * DAY
    if _EPOCH.fullmatch(value):
        return float(value[1:])
    for prefix, suffix, sign in (("-", "", -1), ("+", "", 1), ("", " ago", -1), ("", " left", 1), ("", "", -1)):
        if value.startswith(prefix) and value.endswith(suffix):
            seconds = span(value[len(prefix):len(value) - len(suffix)])
            if seconds is not None:
                return now + sign * seconds
    return _absolute(value, text)


def _absolute(value: str, text: str) -> float:
    from datetime import timezone

    from dateutil.parser import isoparse

    try:
        moment = isoparse(value)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time; use {FORMS}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
