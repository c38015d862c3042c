"""Finding crashes for list, info, extract, debug and rm: in the store the config names or, with ``--remote URL``,
among the crashes shipped to an object store (domain/fleet.RemoteCatalog); by id prefix; a crash's core state; and
its core on local disk for extract and debug."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Optional

from corepipe.commands import options, output
from corepipe.domain import catalog, fleet_index
from corepipe.platform import objectstore
from corepipe.platform.errors import UsageError, UserError
from corepipe.platform.store import core_file


def unreadable(root: str, exc: OSError) -> UserError:
    """The one line for a store that cannot be read: run as root when permission was denied, else what to check
    (a store that is a link, or not a directory, is opened by no command)."""
    advice = "run as root" if exc.errno in (errno.EACCES, errno.EPERM) else "check it is a root-owned directory"
    return UserError(f"cannot read the store {root}: {exc.strerror or exc}; {advice}")


def all_records(root: str) -> list:
    """(path, record) of every crash, oldest first; broken records are warned about on stderr."""
    problems: list = []
    try:
        items = sorted(catalog.iter_records(root, problems), key=catalog.sort_key)
    except OSError as exc:
        raise unreadable(root, exc) from None
    output.warn_problems(problems)
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
    root = options.config(ns).store
    problems: list = []
    try:
        found = catalog.find(root, prefix, problems)
    except OSError as exc:
        raise unreadable(root, exc) from None
    finally:
        output.warn_problems(problems)
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
    if getattr(ns, "remote_catalog", None) is None:
        ns.remote_catalog = open_remote(url)
    return ns.remote_catalog


def open_remote(url: str):  # -> fleet.RemoteCatalog
    """The crashes shipped to ``url``, through its index; BadDestination (exit 2) for a URL that names none."""
    from corepipe.domain import fleet

    try:
        return fleet.RemoteCatalog(objectstore.open_destination(url), output.warn)
    except objectstore.DestinationError as exc:
        raise UserError(f"cannot read {url}: {exc}") from None


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
        yield path, options.config(ns).store
        return
    if (rec.get("core") or {}).get("stored"):
        _check_cap(ns, rec)
    work = tempfile.mkdtemp(prefix="corepipe-remote-")
    try:
        crash_dir = os.path.join(work, "crash")
        os.mkdir(crash_dir, 0o700)
        try:
            if (rec.get("core") or {}).get("stored"):
                remote.fetch_core(path, rec, crash_dir)
            for warning in remote.fetch_binaries(rec, work) if with_binaries else []:
                output.warn(warning)
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


def json_item(path: str, rec: dict) -> dict:
    """A record as ``--json`` prints it: the stored record plus ``path`` and ``core_state``."""
    return {**rec, "path": path, "core_state": core_state(path, rec)}


def _check_cap(ns: argparse.Namespace, rec: dict) -> None:
    """Refuse, before any download, a remote core whose record claims more than ``remote_core_max`` bytes: any
    fleet node writes records, and free space alone would let one fill a workstation's disk."""
    cfg = options.config(ns)
    size = (rec.get("core") or {}).get("size")
    if type(size) is int and 0 < cfg.remote_core_max < size:
        raise UserError(f"the core of crash {rec.get('id')} claims {output.human_size(size)} uncompressed, over "
                        f"remote_core_max = {cfg.remote_core_max}; nothing downloaded (raise "
                        f"remote_core_max in {cfg.path or 'the config'} to fetch it)")


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
        raise UserError(f"the core of crash {rec.get('id')} is {output.human_size(size)} uncompressed and "
                        f"{directory} has {output.human_size(free)} free; {advice}")
