"""``corepipe resolve``: what corepipe would decide about a process or a cgroup text."""

from __future__ import annotations

import argparse
import json

from corepipe.domain import containers, snapshot
from corepipe.platform import procfs
from corepipe.platform.errors import UserError

HELP = "show which container a process (or a /proc/<pid>/cgroup text) belongs to"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("pid", nargs="?", type=int, help="a process ID on this host")
    what.add_argument("--cgroup-file", metavar="FILE",
                      help="a saved /proc/<pid>/cgroup ('-' for stdin); names and images come from this host's state")
    parser.add_argument("--json", action="store_true", help="print the container object as in the record")


def resolve(ns: argparse.Namespace) -> containers.Container:
    if ns.cgroup_file is not None:
        import sys

        try:
            if ns.cgroup_file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(ns.cgroup_file, "rb") as f:
                    data = f.read()
        except OSError as exc:
            raise UserError(f"cannot read {ns.cgroup_file}: {exc.strerror}") from None
        text = data.decode("utf-8", "replace")  # as the handler reads /proc: never fail on a byte
        container = containers.identify(text)
    else:
        proc = procfs.Proc(ns.pid, None)
        procfs.read_proc(proc)
        snap = snapshot.checked(proc)
        if "cgroup" not in snap.files:
            raise UserError(f"no process {ns.pid} (or /proc/{ns.pid}/cgroup unreadable; run as root)")
        return containers.of_process(snap, proc, hostname=None)
    return containers.enrich(container) if not container.is_host else container


def run(ns: argparse.Namespace) -> int:
    container = resolve(ns)
    if ns.json:
        print(json.dumps(container.to_dict(), indent=1))
        return 0
    for key, value in container.to_dict().items():
        if value not in (None, {}, []):
            print(f"{key + ':':<15}{value}")
    return 0
