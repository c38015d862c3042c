"""``corepipe selftest``: crash throwaway processes and check that corepipe collected them."""

from __future__ import annotations

import argparse

from corepipe.commands.options import paths
from corepipe.services import selftest

HELP = "crash a throwaway process (and a throwaway Docker container) and verify their cores were collected"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-container", action="store_true", help="skip the container crash")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each record (%(default)s)")


def run(ns: argparse.Namespace) -> int:
    selftest.run(paths(ns), container=not ns.no_container, timeout=ns.timeout,
                 say=lambda line: print(line, flush=True))
    return 0
