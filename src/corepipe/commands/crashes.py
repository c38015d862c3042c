"""What list, info, extract, debug and rm share: the store from the config (or, with ``--remote URL``, the
crashes shipped to an object store: domain/fleet.RemoteCatalog), id lookup, output helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import Optional

from corepipe.domain import catalog, fleet_index
from corepipe.platform import config as configuration
from corepipe.platform import objectstore
from corepipe.platform.errors import UsageError, UserError
from corepipe.platform.log import clean
from corepipe.platform.store import core_file


def load_config(ns: argparse.Namespace) -> configuration.Config:
    return configuration.load(ns.config)


def store_root(ns: argparse.Namespace) -> str:
    return load_config(ns).store


def warn_problems(problems: list) -> None:
    for path, message in problems:
        print(f"corepipe: warning: {path}: {message}", file=sys.stderr)


def all_records(root: str) -> list:
    """(path, record) of every crash, oldest first; broken records are warned about on stderr."""
    problems: list = []
    try:
        items = sorted(catalog.iter_records(root, problems), key=catalog.sort_key)
    except OSError as exc:
        raise UserError(f"cannot read the store {root}: {exc.strerror or exc} (run as root)") from None
    warn_problems(problems)
    return items


def lookup(ns: argparse.Namespace, prefix: Optional[str]) -> tuple:
    """The crash named by an id prefix (the latest when None), as (path, record)."""
    remote = _remote(ns)
    if remote is not None:
        node = ns.node
        if prefix is not None and "/" in prefix:
            node, prefix = prefix.split("/", 1)
            if ns.node not in (None, node):
                raise UsageError(f"{node}/{prefix} names node {node}, --node names {ns.node}; give one")
        with remote_errors(ns, remote):
            items = remote.items(node, prefix)
            if prefix is None and not items:
                raise catalog.LookupFailed(f"no crashes in {ns.remote}" + (f" from node {node}" if node else ""))
            path, _row = items[-1] if prefix is None else catalog.select(items, prefix)
            return path, remote.record(path)
    root = store_root(ns)
    problems: list = []
    try:
        found = catalog.find(root, prefix, problems)
    except OSError as exc:
        raise UserError(f"cannot read the store {root}: {exc.strerror or exc} (run as root)") from None
    finally:
        warn_problems(problems)
    return found


def add_remote_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remote", metavar="URL",
                        help="read the crashes shipped to URL (az://CONTAINER/PREFIX, s3://BUCKET/PREFIX) "
                             "instead of the local store; credentials as for 'corepipe ship'")
    parser.add_argument("--node", metavar="NAME", help="with --remote: only the crashes node NAME shipped "
                                                       "(an id may also be given as NAME/ID)")


def _remote(ns: argparse.Namespace):  # -> Optional[fleet.RemoteCatalog]; fleet is imported only for --remote
    url = getattr(ns, "remote", None)
    if url is None:
        if getattr(ns, "node", None) is not None:
            raise UsageError("--node needs --remote URL")
        return None
    from corepipe.domain import fleet

    if getattr(ns, "remote_catalog", None) is not None:
        return ns.remote_catalog
    try:
        ns.remote_catalog = fleet.RemoteCatalog(objectstore.open_destination(url), warn_remote)
        return ns.remote_catalog
    except objectstore.DestinationError as exc:
        raise UserError(f"cannot read {url}: {exc}") from None


def warn_remote(message: str) -> None:
    """One line per bad index object or row met in a bucket (they are skipped)."""
    print(f"corepipe: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def remote_errors(ns: argparse.Namespace, remote) -> Iterator[None]:  # noqa: ANN001 - a fleet.RemoteCatalog
    """A failure to read a fleet's bucket or to keep its index cache, as one line naming the URL or the cache."""
    try:
        yield
    except objectstore.DestinationError as exc:
        raise UserError(f"cannot read {ns.remote}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot use the index cache {remote.index.directory}: {exc.strerror or exc} (it is safe "
                        "to delete)") from None


def remote_table(ns: argparse.Namespace) -> tuple:
    """(RemoteCatalog, its up-to-date DuckDB table) for ``--remote`` (domain/fleet_sql.py)."""
    remote = _remote(ns)
    with remote_errors(ns, remote):
        return remote, remote.table()


@contextlib.contextmanager
def local_copy(ns: argparse.Namespace, path: str, rec: dict, with_binaries: bool = False) -> Iterator[tuple]:
    """(crash directory, store root) on local disk: the store's own, or for ``--remote`` a private temporary
    directory holding the downloaded core (and binaries), removed afterwards."""
    remote = _remote(ns)
    if remote is None:
        yield path, store_root(ns)
        return
    work = tempfile.mkdtemp(prefix="corepipe-remote-")
    try:
        crash_dir = os.path.join(work, "crash")
        os.mkdir(crash_dir, 0o700)
        try:
            if (rec.get("core") or {}).get("stored"):
                remote.fetch_core(path, rec, crash_dir)
            for warning in remote.fetch_binaries(rec, work) if with_binaries else []:
                print(f"corepipe: warning: {warning}", file=sys.stderr)
        except objectstore.DestinationError as exc:
            raise UserError(f"cannot download {path}: {exc}") from None
        yield crash_dir, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def core_state(path: str, rec: dict) -> str:
    """present, truncated, partial (the dump was cut short), missing (recorded but gone), none (not stored)
    or collecting."""
    state = fleet_index.core_state(rec)
    # A shipped crash's record object is uploaded only after its core is verified.
    if state not in ("none", "collecting") and not objectstore.is_url(path) and not os.path.lexists(
            os.path.join(path, core_file(rec))):
        return "missing"
    return state


def check_room(directory: str, rec: dict, advice: str) -> None:
    """Refuse, before decompressing, a core the filesystem of ``directory`` cannot hold (a core of zero pages
    is stored 30000:1, so the store's size says nothing about it)."""
    size = (rec.get("core") or {}).get("size") if isinstance(rec.get("core"), dict) else None
    if type(size) is not int or size < 0:
        raise UserError(f"the record of crash {rec.get('id')} states no size of its core ({str(size)[:40]!r}); "
                        "nothing written")
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise UserError(f"the core of crash {rec.get('id')} is {human_size(size)} uncompressed and {directory} "
                        f"has {human_size(free)} free; {advice}")


def json_item(path: str, rec: dict) -> dict:
    """A record as ``--json`` prints it: the stored record plus ``path`` and ``core_state``."""
    return {**rec, "path": path, "core_state": core_state(path, rec)}


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

