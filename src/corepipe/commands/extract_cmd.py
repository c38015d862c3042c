"""``corepipe extract``: write a crash's decompressed core, checked against the digest in its record."""

from __future__ import annotations

import argparse
import os
import sys

from corepipe.commands import lookup
from corepipe.platform import digest, fs, unpack
from corepipe.platform.errors import UsageError, UserError

HELP = "write the decompressed core of a crash to a file or stdout (default: the latest crash)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", nargs="?", help="crash id or a unique prefix of it (default: the latest)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write here (a new 0600 file, replacing FILE); '-' or omitted: stdout, not a terminal")
    lookup.add_remote_option(parser)


def run(ns: argparse.Namespace) -> int:
    path, rec = lookup.lookup(ns, ns.id)
    to_stdout = ns.output in (None, "-")
    if to_stdout and sys.stdout.isatty():
        raise UsageError("refusing to write a core to a terminal; use -o FILE or a pipe")
    with lookup.local_copy(ns, path, rec) as (local, _store):
        return _extract(local, rec, ns.output, to_stdout)


def _extract(path: str, rec: dict, output: str, to_stdout: bool) -> int:
    source = unpack.open_core(path, rec)
    try:
        if to_stdout:
            sys.stdout.flush()
            unpack.to_fd(source, rec, sys.stdout.fileno())
            return 0
        _to_file(source, rec, output)
    except unpack.CoreError as exc:
        raise UserError(f"{exc}; nothing complete was written") from None
    finally:
        os.close(source)
    partial = " of a partial core (the dump was cut short)" if rec["core"].get("complete") is False else ""
    print(f"wrote {rec['core']['size']} bytes{partial} ({digest.stated(rec['core'])[0]} verified) to {output}",
          file=sys.stderr)
    return 0


def _to_file(source: int, rec: dict, output: str) -> None:
    """Write under a hidden temporary name beside ``output`` and rename (fs.replace): ``output`` is complete
    or untouched."""
    lookup.check_room(os.path.dirname(os.path.abspath(output)), rec,
                       "write it to a bigger filesystem (or to a pipe: -o -)")
    try:
        fs.replace(os.path.abspath(output), lambda fd: unpack.to_fd(source, rec, fd), mode=0o600)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
