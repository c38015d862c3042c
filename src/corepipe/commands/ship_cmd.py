"""``corepipe ship``: upload this node's finished crashes to the fleet's object store (see services/ship.py)."""

from __future__ import annotations

import argparse
import sys

from corepipe.commands import options
from corepipe.platform.errors import UsageError, UserError
from corepipe.platform.objectstore import DestinationError
from corepipe.services import ship

HELP = ("upload finished crashes to az://CONTAINER/PREFIX or s3://BUCKET/PREFIX, verified; resident unless "
        "--once (exit 0 all shipped, 1 something failed: one line each on stderr and in the log)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="one sweep of what is pending, then exit (cron, tests)")
    parser.add_argument("--to", metavar="URL", help="destination (default: ship_to in the config)")
    parser.add_argument("--node", metavar="NAME", help="this node's name in the object keys (default: ship_node "
                                                       "in the config, else the host name)")


def run(ns: argparse.Namespace) -> int:
    cfg = options.config(ns)
    url = ns.to or cfg.ship_to
    if not url:
        raise UsageError("no destination: pass --to az://CONTAINER/PREFIX or s3://BUCKET/PREFIX, or set ship_to "
                         "in the config")
    cfg.ship_node = ns.node or cfg.ship_node
    try:
        node = ship.node_name(cfg)
        shipper = ship.Shipper(cfg, ship.connect(url, cfg), node)
    except DestinationError as exc:
        raise UserError(f"cannot ship to {url}: {exc}") from None
    if ns.once:
        result = shipper.sweep()
        ship.report(result)
        for crash_id in result.shipped:
            print(f"shipped {crash_id}")
        return 1 if result.errors else 0
    from corepipe.platform.watch import Watcher

    watcher = Watcher(cfg.store)
    print(f"corepipe ship: shipping {cfg.store} to {url} as node {node} "
          f"({'inotify' if watcher.event_driven else f'polling every {ship.POLL} s'})", file=sys.stderr, flush=True)
    try:
        ship.resident(shipper, watcher)
    finally:
        watcher.close()
    return 0
