"""``corepipe prune``: apply retention and the storage limits to what the store holds (daily, by a timer), and
``uninstall --purge``: delete everything it holds.

Under the store lock, from a fresh scan (which also rebuilds the ledger, so any drift is corrected
daily): crashes older than ``max_age_days`` go whole, temporary files of killed handlers go, saved
binaries no stored core uses go, then the oldest cores until the limits hold (policy.plan, with the
binaries counted as in admission); then every record is counted: the oldest crashes without a core
go while their policy group's records are over ``records_max_use``, and while the records and cores
together are over max_use.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from corepipe.domain import accounting, binaries, catalog, policy
from corepipe.domain.books import Books, rebuild_ledger
from corepipe.platform import fs
from corepipe.platform.config import Config
from corepipe.platform.errors import UserError
from corepipe.platform.store import Store, crash_time


def prune(store: Store, cfg: Config, *, dry_run: bool, say: Callable[[str], None]) -> int:
    """Delete (or with ``dry_run`` only list) what the policy says, one line each to ``say``; returns how many
    deletions failed."""
    failed = 0
    min_age = cfg.timeout + 60  # a handler still collecting may be about to use a temporary file or binary

    def apply(action: Callable[[], object], path: str, reason: str) -> None:
        nonlocal failed
        if dry_run:
            say(f"would delete {path} ({reason})")
            return
        try:
            action()
        except OSError as exc:
            failed += 1
            say(f"error: cannot delete {path}: {exc}")
            return
        say(f"deleted {path} ({reason})")

    with Books(store, save=not dry_run) as books:  # a dry run changes nothing, not even the ledger file
        contents = catalog.scan(store)
        # The ledger as the directories say.
        held = rebuild_ledger(store, contents) if dry_run else books.rebuild(contents)
        now = time.time()
        old = policy.expired(contents.crashes, now=now, max_age_days=cfg.max_age_days)
        for crash in old:
            apply(lambda c=crash: books.delete_crash(c.group, c.crash), f"{store.root}/{crash.group}/{crash.crash}",
                  f"older than max_age_days = {cfg.max_age_days}")
        for temp in contents.temps:
            if now - temp.mtime > min_age:
                apply(lambda t=temp: books.delete_temp(t), f"{store.root}/{temp.group}/{temp.crash}/{temp.name}",
                      "left by a handler that died")
        if not dry_run:
            unused = binaries.prune_unused(store.fd, set(held.binaries), min_age)
            if unused:
                say(f"deleted {unused} saved binaries no stored core uses")
        lim, free = accounting.measure(store, cfg)
        gone = {(c.group, c.crash) for c in old}
        if dry_run:  # nothing was deleted: count the old crashes as gone, as they would be
            free += sum(c.size for c in old)
        reserved = sum(r.size for r in accounting.reservations(books.state, min_age).values())
        entries = [c for g in held.groups() for c in held.cores(g) if (c.group, c.crash) not in gone]
        plan = policy.plan(entries, lim, fs_free=free, reserved=reserved,
                           shared={name: size for name, (size, _refs) in held.binaries.items()})
        for core, reason in plan.delete:
            apply(lambda c=core, r=reason: books.delete_core(c, f"{r} (corepipe prune)"),
                  f"{store.root}/{core.group}/{core.crash}/{core.file}", reason)
        coreless = {(c.group, c.crash) for c, _reason in plan.delete}
        # Every record left, as old as its dump; ``file`` None for a crash without a core (or whose core just went).
        records = [dataclasses.replace(c, time=crash_time(c.crash), file=None if (c.group, c.crash) in coreless
                                       else c.file) for c in contents.crashes if (c.group, c.crash) not in gone]
        budget = policy.records_budget(cfg.records_max_use, lim)
        over = policy.records_over(records, budget)
        for crash in over:
            apply(lambda c=crash: books.delete_crash(c.group, c.crash), f"{store.root}/{crash.group}/{crash.crash}",
                  f"the records of {crash.group} are over records_max_use ({budget} bytes): the oldest without a core")
        dropped = set(over)
        left = [c for c in records if c not in dropped]
        excess = plan.used + sum(c.record for c in left) - lim.max_use
        if lim.max_use and excess > 0:
            for crash in policy.oldest_records([c for c in left if not c.file], excess):
                apply(lambda c=crash: books.delete_crash(c.group, c.crash), f"{store.root}/{crash.group}/{crash.crash}",
                      f"records and cores are over max_use ({lim.max_use} bytes): the oldest crash without a core")
    return failed


def purge(store: str, created: bool) -> str:
    """Delete the collected crashes; the store directory itself too if install created it."""
    if created:
        try:
            fs.remove_tree_when_quiet(store)
        except OSError as exc:
            raise UserError(f"could not delete the store {store}: {exc.strerror}; a crash may still be being "
                               "collected: run 'corepipe uninstall --purge' again") from None
        return f"deleted the store {store}"
    crashes = [path for path, _rec in catalog.iter_records(store)]
    with Store(store, create=False) as opened, Books(opened) as books:
        for path in crashes:
            books.delete_crash(*catalog.group_of(path, store))
        binaries.prune_unused(opened.fd, set(), 0)
    return f"deleted {len(crashes)} crashes from {store} (the directory existed before install: kept)"
