"""``corepipe prune``: apply the retention and storage policy to the store (run daily by corepipe-prune.timer)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

from corepipe.commands import crashes
from corepipe.domain import accounting, policy
from corepipe.platform.errors import UserError
from corepipe.platform.store import Store

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
    pruner = _Pruner(ns.dry_run)
    with store, accounting.Accounting(store) as acc:
        contents = acc.scan()
        now = time.time()
        old = policy.expired(contents.crashes, now=now, max_age_days=cfg.max_age_days)
        for crash in old:
            pruner.apply(acc.delete_crash, crash, f"{store.root}/{crash.group}/{crash.crash}",
                         f"older than max_age_days = {cfg.max_age_days}")
        for temp in contents.temps:
            if now - temp.mtime > cfg.timeout + 60:
                pruner.apply(acc.delete_temp, temp, f"{store.root}/{temp.group}/{temp.crash}/{temp.name}",
                             "left by a handler that died")
        lim, free = accounting.measure(store, cfg)
        if ns.dry_run:  # nothing was deleted: count the old crashes as gone, as they would be
            free += sum(c.size for c in old)
        reserved = sum(r[0] for r in acc.reservations(acc.load_state(), cfg.timeout + 60).values())
        plan = policy.plan([c for c in contents.crashes if c not in old], lim, fs_free=free, reserved=reserved)
        for core, reason in plan.delete:
            pruner.apply(lambda c, r=reason: acc.delete_core(c, f"{r} (corepipe prune)"), core,
                         f"{store.root}/{core.group}/{core.crash}/{core.file}", reason)
    if pruner.failed:
        raise UserError(f"{pruner.failed} deletions failed (see above); check the store's permissions")
    return 0


class _Pruner:
    """Deletes (or, in a dry run, only lists) one thing at a time, one line each."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.failed = 0

    def apply(self, action: Callable[[object], None], what: object, path: str, reason: str) -> None:
        if self.dry_run:
            print(f"would delete {path} ({reason})")
            return
        try:
            action(what)
        except OSError as exc:
            self.failed += 1
            print(f"error: cannot delete {path}: {exc}")
            return
        print(f"deleted {path} ({reason})")
