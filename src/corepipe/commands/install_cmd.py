"""``corepipe install``: make corepipe the kernel's core handler on this host, persistently."""

from __future__ import annotations

import argparse
import os
from typing import Callable

from corepipe.platform import config as configuration
from corepipe.platform import forward
from corepipe.services import install

HELP = "make corepipe the kernel's core dump handler on this host (idempotent)"


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config`` after the subcommand too; SUPPRESS keeps a ``corepipe --config X`` given before it."""
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help=f"config file; the install state lives beside it (default {configuration.DEFAULT_PATH})")


def paths(ns: argparse.Namespace) -> install.Paths:
    defaults = install.Paths()
    return install.Paths(bin=getattr(ns, "bin", defaults.bin), config=ns.config or defaults.config,
                         sysctl_dir=getattr(ns, "sysctl_dir", defaults.sysctl_dir))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument("--store", metavar="DIR", help=f"where cores are kept (default: the config's store, "
                                                       f"else {configuration.DEFAULT_STORE})")
    parser.add_argument("--bin", metavar="PATH", default=install.Paths.bin,
                        help="the launcher the kernel runs (default %(default)s)")
    parser.add_argument("--sysctl-dir", metavar="DIR", default=install.Paths.sysctl_dir,
                        help=f"where the {install.DROPIN_NAME} drop-in goes (default %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace another handler's core_pattern (uninstall gives it back) or a foreign --bin")
    parser.add_argument("--mode", choices=("auto", install.SOCKET, install.PIPE), default="auto",
                        help="socket: the resident 'corepipe serve' collects on the kernel's coredump socket while "
                             "it runs, the pipe handler otherwise; pipe: a 'corepipe collect' per crash; "
                             "auto (default): socket where the kernel has it (kernel.core_modes)")
    parser.add_argument("--socket", default=install.DEFAULT_SOCKET, metavar="PATH",
                        help="the socket of socket mode (default %(default)s)")
    parser.add_argument("--run-dir", default=os.path.dirname(forward.DEFAULT_SOCKET), metavar="DIR",
                        help="corepipe serve's run directory (serve --run-dir): the handler hands crashes to the "
                             "server's DIR/forward.sock (default %(default)s)")


def report(action: Callable[[], list]) -> int:
    """Run install or uninstall and print its lines."""
    for line in action():
        print(line)
    return 0


def run(ns: argparse.Namespace) -> int:
    report(lambda: install.install(paths(ns), store=ns.store, force=ns.force, mode=ns.mode, socket_path=ns.socket,
                                   forward_socket=forward.socket_path(os.path.abspath(ns.run_dir))))
    print("next: 'corepipe selftest' proves a crash is collected")
    return 0
