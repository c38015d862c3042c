"""``corepipe status``: is corepipe collecting, as installed, and what has it collected."""

from __future__ import annotations

import argparse
import json
import time

from corepipe.commands.options import paths
from corepipe.commands.output import human_size as size
from corepipe.commands.output import shown
from corepipe.services import status

HELP = ("show whether corepipe is the active core handler and what its store holds "
        "(exit 0 healthy, 3 not installed, 4 drifted, 5 broken, 1 the install state is unreadable: not root)")
#: Policy groups named on the "records dropped" line (the most first).
DROPPED_SHOWN = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def _when(stamp: object) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if isinstance(stamp, (int, float)) else "?"


def run(ns: argparse.Namespace) -> int:
    facts = status.gather(paths(ns))
    if ns.json:
        print(json.dumps(facts, indent=1))
        return facts["code"]
    state = {status.HEALTHY: "healthy", status.NOT_INSTALLED: "not installed", status.DRIFTED: "drifted",
             status.BROKEN: "broken"}[facts["code"]]
    print(f"corepipe: {state}{' (the active core handler)' if facts['active'] else ''}")
    print(f"kernel.core_pattern = {facts['pattern']}")
    print(f"kernel.core_pipe_limit = {facts['pipe_limit']}")
    if facts.get("listener") is False:
        print("listener: none on the pattern's socket (broken: the kernel drops every core)")
    if facts["mode"]:
        print(f"mode: {facts['mode']} installed, {facts['active_mode'] or 'neither'} active")
    if facts["handler"]:
        print(f"handler: {facts['handler']['kind']} {facts['handler']['program']}")
    if facts["transport"]:
        forwarding = facts["forwarding"]
        print(f"transport: {facts['transport']}; forwarding to serve: "
              f"{'works' if forwarding['works'] else forwarding['problem']}")
    server = facts["server"]
    if server and not server["alive"]:
        print(f"server: not running (serve.json names pid {server.get('pid')}, a corepipe serve that died without "
              "removing it); start it: systemctl start corepipe.socket, or run corepipe serve")
    elif server:
        state = "healthy" if server["fresh"] else "stuck (no heartbeat)"
        print(f"server: corepipe serve pid {server['pid']} {state}, {server.get('mode') or 'socket'} mode, socket "
              f"{server['socket'] or '-'}, handoffs on {server.get('forward_socket') or '-'}, "
              f"{server['busy']} busy, {server['queued']} waiting, {server['stats']['accepted']} crashes accepted")
    if facts["expected"] and not facts["active"]:
        print(f"installed pattern    = {facts['expected']['pattern']}")
    for problem in facts["problems"]:
        print(f"problem: {problem}")
    store = facts["store"]
    if store is None:
        return facts["code"]
    if not store["exists"]:
        print(f"store: {store['path']} (not created yet)")
        return facts["code"]
    if not store["readable"]:
        print(f"store: {store['errors'][0]}")
        return facts["code"]
    print(f"store: {store['path']}: {store['crashes']} crashes, {size(store['used_bytes'])} used, "
          f"{size(store['free_bytes'])} free")
    dropped = store.get("records_dropped") or {}
    if dropped:
        most = sorted(dropped.items(), key=lambda item: (-item[1], item[0]))
        print(f"records dropped (over records_max_use or below keep_free): {sum(dropped.values())} ("
              + ", ".join(f"{group} {count}" for group, count in most[:DROPPED_SHOWN])
              + (f", {len(most) - DROPPED_SHOWN} more groups" if len(most) > DROPPED_SHOWN else "") + ")")
    if store["containers"]:
        print("crashes per container:")
        for group in store["containers"]:
            where = "host" if group["runtime"] == "host" else f"{group['runtime']} {(group['id'] or '?')[:12]}"
            print(f"  {where:<20} {group['name'] or '':<24} {group['crashes']:>5} ({group['cores']} with core)")
    if store["recent"]:
        print("last crashes:")
        for crash in store["recent"]:
            where = "host" if crash["runtime"] == "host" else f"{crash['runtime']}/{(crash['container'] or '?')[:12]}"
            print(f"  {crash['time']}  {where:<20} pid {shown(crash['pid'])} ({crash['comm'] or '?'}) "
                  f"{crash['signal'] or '?'}  core {size(crash['core_size'])}  {crash['status']}")
    ship = store.get("ship")
    if ship:
        print(f"shipping: to {ship.get('destination')} as node {ship.get('node')}: {ship['backlog']} crashes not "
              f"shipped yet; last sweep {_when(ship.get('time'))} {'ok' if ship.get('ok') else 'FAILED'}")
        error = ship.get("last_error") or {}
        if error:
            print(f"shipping: last error ({_when(error.get('time'))}): {error.get('message')}")
    for error in store["errors"]:
        print(f"unreadable: {error}")
    return facts["code"]
