"""``corepipe list``: the collected crashes, oldest first, filtered."""

from __future__ import annotations

import argparse
import os
import signal as signals
import sys
from typing import Callable

from corepipe.commands import lookup, options, output, times
from corepipe.domain import batch, signature

HELP = "list collected crashes (newest last)"
#: SIZE is the core as the process had it (what extract or debug will need), STORED what it takes in the store.
HEADERS = ["ID", "TIME", "CONTAINER", "POD", "PID", "SIGNAL", "COMM", "SIZE", "STORED", "CORE"]
GROUP_HEADERS = ["HASH", "COUNT", "CORES", "FIRST", "LAST", "CONTAINERS", "SAMPLE", "SIGNATURE"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--container", metavar="NAME|ID", help="container name, or id prefix")
    parser.add_argument("--pod", metavar="NAME", help="Kubernetes pod name")
    parser.add_argument("--namespace", metavar="NAME", help="Kubernetes namespace")
    parser.add_argument("--job", metavar="JOB", help="Azure Batch job id")
    parser.add_argument("--task", metavar="TASK", help="Azure Batch task id")
    parser.add_argument("--image", metavar="IMAGE", help="image reference, with or without its tag")
    parser.add_argument("--since", metavar="TIME", type=times.parse_time,
                        help=f"crashes at or after TIME: {times.FORMS}")
    parser.add_argument("--until", metavar="TIME", type=times.parse_time, help="crashes at or before TIME")
    parser.add_argument("--signal", metavar="SIG", type=signal_filter, help="signal name (SEGV, SIGABRT) or number")
    parser.add_argument("--exe", metavar="PATH|NAME", help="executable path, its file name, or comm")
    parser.add_argument("--signature", metavar="HASH|TEXT", help="signature hash (or a prefix of it), or its text")
    last = parser.add_mutually_exclusive_group()
    last.add_argument("-n", type=count, metavar="N", help="only the last N crashes")
    last.add_argument("-1", dest="n", action="store_const", const=1, help="only the latest crash (-n 1)")
    parser.add_argument("-r", "--reverse", action="store_true",
                        help="the other way round: newest first (--group: fewest crashes first)")
    parser.add_argument("--no-legend", dest="legend", action="store_false", help="no header line in the table")
    parser.add_argument("--group", action="store_true",
                        help="one row per signature: count, cores, first and last seen, containers, a sample id")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON array of records, one record a line (docs/record.md)")
    lookup.add_remote_option(parser)


def count(text: str) -> int:
    """``-n``'s value: a number of crashes, 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of crashes; use 1 or more")
    return int(text)


def signal_filter(text: str) -> object:
    """``--signal``'s value as records hold it: a number (1 to SIGRTMAX), or the signal's name for a name with
    or without SIG, in any case, aliases included (``segv``, ``SIGIOT`` is SIGABRT)."""
    if text.isdigit() and 0 < int(text) <= signals.SIGRTMAX:
        return int(text)
    name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
    try:
        return signals.Signals[name].name
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal; use a name (SEGV, SIGABRT) or a number "
                                         f"1-{int(signals.SIGRTMAX)}") from None


def _image_matches(image: str, wanted: str) -> bool:
    if image == wanted:
        return True
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return ":" in last and name[: len(name) - len(last)] + last.split(":", 1)[0] == wanted


def _signal_matches(signal: dict, wanted: object) -> bool:
    return signal.get("number" if isinstance(wanted, int) else "name") == wanted


def matches(rec: dict, ns: argparse.Namespace) -> bool:
    container = rec.get("container") or {}
    if ns.container is not None and ns.container not in (container.get("name"), container.get("id")) and not (
            container.get("id") and container["id"].startswith(ns.container)):
        return False
    if ns.pod is not None and container.get("pod_name") != ns.pod:
        return False
    if ns.namespace is not None and container.get("pod_namespace") != ns.namespace:
        return False
    task = batch.of_record(rec)
    if (ns.job is not None and task.get("job") != ns.job) or (ns.task is not None and task.get("task") != ns.task):
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


def _container_cell(rec: dict) -> str:
    """The container, and the Azure Batch job/task it ran when the crash has one (``?``: unconfirmed, from the
    process's own environment)."""
    container = rec.get("container") or {}
    if container.get("runtime") == "host":
        cell = "host"
    else:
        cell = container.get("name") or (container.get("id") or "")[:12] or container.get("runtime") or "?"
    task = batch.of_record(rec)
    if task.get("job") or task.get("task"):
        cell += f" ({task.get('job') or '-'}/{task.get('task') or '-'}{'' if task.get('confirmed') is True else '?'})"
    return cell


def _pod_cell(container: dict) -> str:
    pod, namespace = container.get("pod_name"), container.get("pod_namespace")
    if not pod:
        return "-"
    return f"{namespace}/{pod}" if namespace else pod


def row(path: str, rec: dict) -> list:
    container = rec.get("container") or {}
    signal = rec.get("signal") or {}
    return [rec.get("id"), rec.get("time") or "-", _container_cell(rec), _pod_cell(container),
            rec.get("pid") if rec.get("pid") is not None else "-",
            signal.get("name") or signal.get("number") or "-", rec.get("comm") or "-",
            output.human_size((rec.get("core") or {}).get("size")),
            output.human_size((rec.get("core") or {}).get("compressed_size")), lookup.core_state(path, rec)]


def run(ns: argparse.Namespace) -> int:
    if ns.remote is not None:
        return _run_remote(ns)
    items = lookup.all_records(options.config(ns).store)
    if ns.signature is not None:
        items = with_signature(items, ns.signature)
    items = [(path, rec) for path, rec in items if matches(rec, ns)]
    if ns.n is not None:
        items = items[-ns.n:]
    if ns.group:
        return _print(signature.groups(items), ns, GROUP_HEADERS, group_row)
    return _print(items, ns, HEADERS, lambda item: row(*item), lambda item: lookup.json_item(*item))


def _run_remote(ns: argparse.Namespace) -> int:
    """The same listing from a fleet's index, filtered and grouped as SQL (domain/fleet_sql.py), with the node
    each crash came from."""
    from corepipe.domain import fleet_sql

    remote, con = lookup.remote_table(ns)
    filters = {name: getattr(ns, name) for name in ("node", "container", "pod", "namespace", "job", "task", "image",
                                                    "since", "until", "signal", "exe", "signature")}
    if ns.group:
        return _print(fleet_sql.groups(con, filters, ns.n), ns, [*GROUP_HEADERS[:5], "NODES", *GROUP_HEADERS[5:]],
                      lambda g: [*group_row(g)[:5], len(g["nodes"]), *group_row(g)[5:]])
    items = ((remote.path(found), found) for found in fleet_sql.crashes_matching(con, filters, ns.n))
    if ns.json and not ns.reverse:  # streamed: a fleet's listing is never all in memory
        output.write_json_array(lookup.json_item(path, rec) for path, rec in items)
        return 0
    return _print(list(items), ns, ["NODE", *HEADERS], lambda item: [item[1]["node"], *row(*item)],
                  lambda item: lookup.json_item(*item))


def _print(items: list, ns: argparse.Namespace, headers: list, to_row: Callable, to_json: Callable = dict) -> int:
    """``items`` (oldest first) as the options ask: JSON or a table, ``--reverse``d, with or without legend."""
    if ns.reverse:
        items = items[::-1]
    if ns.json:
        output.write_json_array(to_json(item) for item in items)
    elif items:
        sys.stdout.write(output.table(headers, [to_row(item) for item in items], legend=ns.legend))
    else:
        print("no crashes match", file=sys.stderr)
    return 0
