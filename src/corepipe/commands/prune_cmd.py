"""``corepipe prune``: apply the retention and storage policy to the store (run daily by corepipe-prune.timer)."""

from __future__ import annotations

import argparse
import os

from corepipe.commands import crashes
from corepipe.platform.errors import UserError
from corepipe.platform.store import Store
from corepipe.services import prune

HELP = "delete old crashes and cores over the storage limits (--dry-run: only show what would go)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")


def run(ns: argparse.Namespace) -> int:
    cfg = crashes.load_config(ns)
    if not os.path.isdir(cfg.store):
        print(f"the store {cfg.store} does not exist yet: nothing to prune")
        return 0
    try:
        store = Store(cfg.store, create=False)
    except OSError as exc:
        raise UserError(f"cannot open the store {cfg.store}: {exc}; check it is a root-owned directory") from None
    with store:
        failed = prune.prune(store, cfg, dry_run=ns.dry_run, say=print)
    if failed:
        raise UserError(f"{failed} deletions failed (see above); check the store's permissions")
    return 0
