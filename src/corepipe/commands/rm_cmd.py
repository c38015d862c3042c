"""``corepipe rm``: remove crashes deliberately, with the saved binaries no other stored core uses."""

from __future__ import annotations

import argparse

from corepipe.commands import lookup, options
from corepipe.domain import catalog
from corepipe.domain.books import Books
from corepipe.platform.errors import UserError
from corepipe.platform.store import Store

HELP = "remove crashes (core, record and saved binaries no other crash uses)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="+", metavar="ID", help="crash ids or unique prefixes")


def run(ns: argparse.Namespace) -> int:
    cfg = options.config(ns)
    items = lookup.all_records(cfg.store)
    chosen = {}
    for prefix in ns.ids:
        path, rec = catalog.select(items, prefix)  # LookupFailed names the prefix: nothing is removed
        chosen[path] = rec
    pruned = 0
    try:
        with Store(cfg.store, create=False) as store, Books(store) as books:
            for path, rec in chosen.items():
                group, name = catalog.group_of(path, cfg.store)
                pruned += books.delete_crash(group, name)
                print(f"removed {rec['id']} ({path})")
    except OSError as exc:
        raise UserError(f"cannot remove from {cfg.store}: {exc}; check it is a root-owned directory") from None
    if pruned:
        print(f"removed {pruned} saved binaries no crash uses any more")
    return 0
