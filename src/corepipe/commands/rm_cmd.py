"""``corepipe rm``: remove crashes deliberately, and the saved binaries no crash uses any more."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import time

from corepipe.commands import crashes
from corepipe.domain import binaries, catalog
from corepipe.platform.errors import UserError
from corepipe.platform.store import BUILD_ID

HELP = "remove crashes (core, record and saved binaries no other crash uses)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="+", metavar="ID", help="crash ids or unique prefixes")


def referenced(items: list) -> set:
    """The saved binaries (area directory, file name) that the records of ``items`` refer to."""
    names = set()
    for _path, rec in items:
        for entry in (rec.get("binaries") or {}).get("files") or []:
            name = binaries.stored_name(entry) if entry.get("stored") else None
            if name:
                names.add(name)
    return names


def prune_binaries(store: str, keep: set, min_age: float) -> int:
    """Delete saved binaries no record refers to, if older than ``min_age`` seconds (a collection may be
    about to refer to a newer one). Returns how many were deleted."""
    area = os.path.join(store, BUILD_ID)
    removed = 0
    now = time.time()
    for directory in sorted(os.listdir(area)) if os.path.isdir(area) and not os.path.islink(area) else []:
        sub = os.path.join(area, directory)
        if not stat.S_ISDIR(os.lstat(sub).st_mode):
            continue
        for name in os.listdir(sub):
            st = os.lstat(os.path.join(sub, name))
            if (directory, name) not in keep and stat.S_ISREG(st.st_mode) and now - st.st_mtime > min_age:
                os.unlink(os.path.join(sub, name))
                removed += 1
    return removed


def run(ns: argparse.Namespace) -> int:
    cfg = crashes.load_config(ns)
    items = crashes.all_records(cfg.store)
    chosen = {}
    for prefix in ns.ids:
        try:
            path, rec = catalog.select(items, prefix)
        except catalog.LookupFailed as exc:
            raise UserError(str(exc)) from None
        chosen[path] = rec
    for path, rec in chosen.items():
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UserError(f"{path} is not a directory; not removed")
        shutil.rmtree(path)
        print(f"removed {rec['id']} ({path})")
    kept = [item for item in items if item[0] not in chosen]
    pruned = prune_binaries(cfg.store, referenced(kept), cfg.timeout + 60)
    if pruned:
        print(f"removed {pruned} saved binaries no crash uses any more")
    return 0
