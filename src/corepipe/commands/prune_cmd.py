"""``corepipe prune``: apply the retention and storage policy to the store (run daily by corepipe-prune.timer)."""

from __future__ import annotations

import argparse
from typing import Optional

from corepipe.commands import options
from corepipe.platform.config import Config
from corepipe.platform.errors import UserError
from corepipe.platform.store import Store
from corepipe.services import prune

HELP = "delete old crashes and cores over the storage limits (--dry-run: only show what would go)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")


@options.with_store
def run(ns: argparse.Namespace, cfg: Config, store: Optional[Store]) -> int:
    if store is None:
        print(f"the store {cfg.store} does not exist yet: nothing to prune")
        return 0
    failed = prune.prune(store, cfg, dry_run=ns.dry_run, say=print)
    if failed:
        raise UserError(f"{failed} deletions failed (see above); check the store's permissions")
    return 0
