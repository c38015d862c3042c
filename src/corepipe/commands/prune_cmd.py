"""``corepipe prune``: apply the retention and storage policy to the store (run daily by corepipe-prune.timer), or with
``--remote`` retention to a fleet's bucket (services/remote_prune.py)."""

from __future__ import annotations

import argparse
import os

from corepipe.commands import lookup, options
from corepipe.platform.errors import UsageError, UserError
from corepipe.platform.store import Store
from corepipe.services import prune

HELP = "delete old crashes and cores over the storage limits (--dry-run: only show what would go)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    parser.add_argument("--remote", metavar="URL", help="prune the fleet's bucket at URL (az://CONTAINER/PREFIX, "
                                                        "s3://BUCKET/PREFIX) instead of the local store")
    parser.add_argument("--max-age", metavar="DAYS", type=float,
                        help="with --remote: delete the crashes dumped more than DAYS days ago")
    parser.add_argument("--keep-per-signature", metavar="N", type=int,
                        help="with --remote: keep the N newest crashes of each signature (with --max-age: of the old "
                             "ones; alone: delete all but the N newest of each)")


def run(ns: argparse.Namespace) -> int:
    if ns.remote is not None:
        return _remote(ns)
    if ns.max_age is not None or ns.keep_per_signature is not None:
        raise UsageError("--max-age and --keep-per-signature need --remote URL (the local store's retention is "
                         "max_age_days in the config)")
    return _local(ns)


def _local(ns: argparse.Namespace) -> int:
    cfg = options.config(ns)
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


def _remote(ns: argparse.Namespace) -> int:
    if ns.max_age is None and ns.keep_per_signature is None:
        raise UsageError("prune --remote needs --max-age DAYS, --keep-per-signature N or both")
    if (ns.max_age is not None and not ns.max_age >= 0) or (ns.keep_per_signature or 0) < 0:
        raise UsageError("--max-age and --keep-per-signature must not be negative")
    from corepipe.services import remote_prune

    remote, _table = lookup.remote_table(ns)
    with lookup.remote_errors(ns, remote):
        result = remote_prune.prune(remote, ns.max_age, ns.keep_per_signature, dry_run=ns.dry_run, say=print)
    if result.failed:
        raise UserError(f"{result.failed} deletions failed (see above); check the pruner's rights on {ns.remote} "
                        "(docs/shipping.md) and run it again")
    if not (result.crashes or result.binaries or result.index or result.tombstones):
        print(f"nothing under {ns.remote} to prune")
    return 0
