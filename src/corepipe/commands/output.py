"""How the commands print crashes: sizes, unknown values, tables, JSON, and warnings on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from corepipe.platform.log import clean


def warn(message: str) -> None:
    """One warning line on stderr (a bad record skipped, a bad index row in a bucket, a saved file gone)."""
    print(f"corepipe: warning: {message}", file=sys.stderr)


def warn_problems(problems: list) -> None:
    for path, message in problems:
        warn(f"{path}: {message}")


def write_json_array(values: Iterable) -> None:
    """A JSON array on stdout, one compact value per line: the C encoder writes 3,000 records in a fraction of a
    second (an indented dump runs the pure-Python one), ``| head -1`` or ``grep`` still work line by line, and an
    iterator is written as it comes (a fleet may list 100,000)."""
    out = sys.stdout
    separator = "[\n"
    for value in values:
        out.write(separator + json.dumps(value, default=str))
        separator = ",\n"
    out.write("[]\n" if separator == "[\n" else "\n]\n")


def write_json(value: object) -> None:
    """One JSON value (``info --json``'s record, a query's rows) on stdout, indented."""
    json.dump(value, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def shown(value: object) -> str:
    """A record's value as the commands print it: ``?`` when it is unknown (None), never Python's ``None``."""
    return "?" if value is None else str(value)


def human_size(size: object) -> str:
    """A byte count as every command shows one (``512B``, ``1.5K``, ``12M``, ``3.2G``); ``-`` when unknown."""
    if not isinstance(size, int) or isinstance(size, bool):
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def table(headers: list, rows: list, legend: bool = True) -> str:
    """Aligned columns on a terminal; tab-separated fields, no padding, when piped; the header line unless not
    ``legend``."""
    lines = ([headers] if legend else []) + [[clean(str(cell)) for cell in row] for row in rows]
    if not sys.stdout.isatty():
        return "".join("\t".join(line) + "\n" for line in lines)
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() + "\n" for line in lines)
