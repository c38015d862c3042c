"""``corepipe uninstall``: give the kernel back what install saved and remove what it created."""

from __future__ import annotations

import argparse

from corepipe.commands.options import paths
from corepipe.services import install

HELP = "restore the previous core handler and remove corepipe's launcher and drop-in (cores are kept)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--purge", action="store_true", help="also delete the collected cores and records")
    parser.add_argument("--force", action="store_true",
                        help="restore the saved core_pattern even if another handler changed it since install")


def run(ns: argparse.Namespace) -> int:
    for line in install.uninstall(paths(ns), purge=ns.purge, force=ns.force):
        print(line)
    return 0
