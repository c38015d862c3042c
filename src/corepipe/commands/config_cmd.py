"""``corepipe config check``: is a config file usable, and which settings does it give.

Exit codes: 0 the file is valid (its settings are printed); 1 it has problems: one line each on stderr, and the
settings printed are the ones the handler would use (a bad key left at its default; a file that is not TOML at
all: every default); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from corepipe.commands import options
from corepipe.platform import config as configuration

HELP = "check a config file and print the settings in effect (exit 1 with one line per problem)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("check", help=HELP, description=HELP, parents=[options.parent()])


def run(ns: argparse.Namespace) -> int:
    path = ns.config or configuration.DEFAULT_PATH
    problems: list = []
    try:
        cfg = configuration.load(path, problems)
    except configuration.ConfigError as exc:
        problems.append(f"{exc} (the handler uses every default)")
        cfg = configuration.Config()
    print(f"# {path}: {'valid' if not problems else f'{len(problems)} problem(s)'}; the settings in effect:")
    print(configuration.render(cfg), end="")
    for problem in problems:
        print(f"corepipe config check: {problem}", file=sys.stderr)
    return 1 if problems else 0
