"""``corepipe install``: make corepipe the kernel's core handler on this host, persistently."""

from __future__ import annotations

import argparse
import os

from corepipe.commands.options import paths
from corepipe.platform import config as configuration
from corepipe.platform import coredump_socket, forward
from corepipe.services import install

HELP = "make corepipe the kernel's core dump handler on this host (idempotent)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
                             "it runs, the pipe handler otherwise; pipe: the pipe handler hands each crash to "
                             "'corepipe serve' while it runs and collects it itself otherwise; auto (default): an "
                             "installation's mode; else pipe where the static forwarder is built "
                             "(faster for big cores), socket where the kernel has it (kernel.core_modes), else pipe")
    parser.add_argument("--socket", default=coredump_socket.DEFAULT_SOCKET, metavar="PATH",
                        help="the socket of socket mode (default %(default)s)")
    parser.add_argument("--run-dir", default=os.path.dirname(forward.DEFAULT_SOCKET), metavar="DIR",
                        help="corepipe serve's run directory (serve --run-dir): the handler hands crashes to the "
                             "server's DIR/forward.sock (default %(default)s)")


def run(ns: argparse.Namespace) -> int:
    for line in install.install(paths(ns), store=ns.store, force=ns.force, mode=ns.mode, socket_path=ns.socket,
                                forward_socket=forward.socket_path(os.path.abspath(ns.run_dir))):
        print(line)
    print("next: 'corepipe selftest' proves a crash is collected")
    return 0
