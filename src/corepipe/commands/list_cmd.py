"""``corepipe list``: the collected crashes, oldest first, filtered."""

from __future__ import annotations

import argparse
import os
import sys

from corepipe.commands import crashes
from corepipe.domain import signature

HELP = "list collected crashes (newest last)"
#: SIZE is the core as the process had it (what extract or debug will need), STORED what it takes in the store.
HEADERS = ["ID", "TIME", "CONTAINER", "POD", "PID", "SIGNAL", "COMM", "SIZE", "STORED", "CORE"]
GROUP_HEADERS = ["HASH", "COUNT", "CORES", "FIRST", "LAST", "CONTAINERS", "SAMPLE", "SIGNATURE"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--container", metavar="NAME|ID", help="container name, or id prefix")
    parser.add_argument("--pod", metavar="NAME", help="Kubernetes pod name")
    parser.add_argument("--namespace", metavar="NAME", help="Kubernetes namespace")
    parser.add_argument("--image", metavar="IMAGE", help="image reference, with or without its tag")
    parser.add_argument("--since", metavar="TIME", type=crashes.parse_time,
                        help="crashes at or after TIME (2026-11-27[T09:24[:57]] UTC, @EPOCH, or an age: 30m, 2h, 1d)")
    parser.add_argument("--until", metavar="TIME", type=crashes.parse_time, help="crashes at or before TIME")
    parser.add_argument("--signal", metavar="SIG", help="signal name (SEGV, SIGABRT) or number")
    parser.add_argument("--exe", metavar="PATH|NAME", help="executable path, its file name, or comm")
    parser.add_argument("--signature", metavar="HASH|TEXT", help="signature hash (or a prefix of it), or its text")
    parser.add_argument("-n", type=int, metavar="N", help="only the last N crashes")
    parser.add_argument("--group", action="store_true",
                        help="one row per signature: count, cores, first and last seen, containers, a sample id")
    parser.add_argument("--json", action="store_true", help="print one JSON array of records (see README)")
    crashes.add_remote_option(parser)


def _image_matches(image: str, wanted: str) -> bool:
    if image == wanted:
        return True
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return ":" in last and name[: len(name) - len(last)] + last.split(":", 1)[0] == wanted


def _signal_matches(signal: dict, wanted: str) -> bool:
    if wanted.isdigit():
        return signal.get("number") == int(wanted)
    name = wanted.upper()
    return signal.get("name") in (name, "SIG" + name)


def matches(rec: dict, ns: argparse.Namespace) -> bool:
    container = rec.get("container") or {}
    if ns.container is not None and ns.container not in (container.get("name"), container.get("id")) and not (
            container.get("id") and container["id"].startswith(ns.container)):
        return False
    if ns.pod is not None and container.get("pod_name") != ns.pod:
        return False
    if ns.namespace is not None and container.get("pod_namespace") != ns.namespace:
        return False
    if ns.image is not None and not _image_matches(container.get("image") or "", ns.image):
        return False
    stamp = rec.get("timestamp") if isinstance(rec.get("timestamp"), (int, float)) else 0
    if (ns.since is not None and stamp < ns.since) or (ns.until is not None and stamp > ns.until):
        return False
    if ns.signal is not None and not _signal_matches(rec.get("signal") or {}, ns.signal):
        return False
    exe = rec.get("exe") or ""
    return ns.exe is None or ns.exe in (exe, os.path.basename(exe), rec.get("comm"))


def with_signature(items: list, wanted: str) -> list:
    """The (path, record) items whose signature (as grouped: signature.keys) has the hash prefix or text
    ``wanted``."""
    records = [rec for _path, rec in items]
    texts = {g["hash"] for g in signature.groups(items) if g["signature"] == wanted}
    return [item for item, k in zip(items, signature.keys(records))
            if wanted and (k.startswith(wanted.lower()) or k in texts)]


def group_row(group: dict) -> list:
    return [group["hash"], group["count"], group["cores"], group["first_seen"] or "-", group["last_seen"] or "-",
            ",".join(group["containers"]) or "-", group["sample"], group["signature"]]


def _container_cell(container: dict) -> str:
    if container.get("runtime") == "host":
        return "host"
    return container.get("name") or (container.get("id") or "")[:12] or container.get("runtime") or "?"


def _pod_cell(container: dict) -> str:
    pod, namespace = container.get("pod_name"), container.get("pod_namespace")
    if not pod:
        return "-"
    return f"{namespace}/{pod}" if namespace else pod


def row(path: str, rec: dict) -> list:
    container = rec.get("container") or {}
    signal = rec.get("signal") or {}
    return [rec.get("id"), rec.get("time") or "-", _container_cell(container), _pod_cell(container),
            rec.get("pid") if rec.get("pid") is not None else "-",
            signal.get("name") or signal.get("number") or "-", rec.get("comm") or "-",
            crashes.human_size((rec.get("core") or {}).get("size")),
            crashes.human_size((rec.get("core") or {}).get("compressed_size")), crashes.core_state(path, rec)]


def run(ns: argparse.Namespace) -> int:
    if ns.remote is not None:
        return _run_remote(ns)
    items = crashes.all_records(crashes.store_root(ns))
    if ns.signature is not None:
        items = with_signature(items, ns.signature)
    items = [(path, rec) for path, rec in items if matches(rec, ns)]
    if ns.n is not None:
        items = items[-ns.n:] if ns.n > 0 else []
    if ns.group:
        return _print_groups(signature.groups(items), ns.json, False)
    return _print_items(items, ns.json, False)


def _run_remote(ns: argparse.Namespace) -> int:
    """The same listing from a fleet's index, filtered and grouped as SQL (domain/fleet_sql.py)."""
    from corepipe.domain import fleet_sql

    remote, con = crashes.remote_table(ns)
    filters = {name: getattr(ns, name) for name in ("node", "container", "pod", "namespace", "image", "since",
                                                    "until", "signal", "exe", "signature")}
    if ns.group:
        return _print_groups(fleet_sql.groups(con, filters, ns.n), ns.json, True)
    items = ((remote.path(row), row) for row in fleet_sql.crashes_matching(con, filters, ns.n))
    if ns.json:  # streamed: a fleet's listing is never all in memory
        crashes.print_json_items(crashes.json_item(path, rec) for path, rec in items)
        return 0
    return _print_items(list(items), False, True)


def _print_items(items: list, as_json: bool, fleet: bool) -> int:
    """The crashes as JSON or a table (with a NODE column for a fleet's)."""
    if as_json:
        crashes.print_json([crashes.json_item(path, rec) for path, rec in items])
    elif items and fleet:
        sys.stdout.write(crashes.table(["NODE", *HEADERS], [[rec["node"], *row(path, rec)] for path, rec in items]))
    elif items:
        sys.stdout.write(crashes.table(HEADERS, [row(path, rec) for path, rec in items]))
    else:
        print("no crashes match", file=sys.stderr)
    return 0


def _print_groups(groups: list, as_json: bool, fleet: bool) -> int:
    if as_json:
        crashes.print_json(groups)
    elif groups and fleet:
        sys.stdout.write(crashes.table(GROUP_HEADERS[:5] + ["NODES"] + GROUP_HEADERS[5:],
                                       [[*group_row(g)[:5], len(g["nodes"]), *group_row(g)[5:]] for g in groups]))
    elif groups:
        sys.stdout.write(crashes.table(GROUP_HEADERS, [group_row(group) for group in groups]))
    else:
        print("no crashes match", file=sys.stderr)
    return 0
