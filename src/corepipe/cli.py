"""The ``corepipe`` command line.

``corepipe collect`` is run by the kernel for every crash, so it is dispatched before
argparse or any other subcommand is imported: the handler's start-up stays lean.

Exit codes (all commands): 0 success, 1 failure (one line on stderr says what to do),
2 usage error, 141 the output pipe was closed early (``corepipe list | head``: quietly, like a command
ended by SIGPIPE); ``status`` adds its own (see its help). Everything printed goes through
log.CleanOutput: no command prints a control character from a record or a process.
"""

from __future__ import annotations

import sys

#: Subcommand name -> module in corepipe.commands; each has ``HELP``, ``add_arguments(parser)`` and ``run(ns)``.
COMMANDS = {
    "resolve": "resolve_cmd",
    "list": "list_cmd",
    "info": "info_cmd",
    "extract": "extract_cmd",
    "debug": "debug_cmd",
    "rm": "rm_cmd",
    "install": "install_cmd",
    "uninstall": "uninstall_cmd",
    "status": "status_cmd",
    "selftest": "selftest_cmd",
    "prune": "prune_cmd",
    "serve": "serve_cmd",
    "metrics": "metrics_cmd",
    "ship": "ship_cmd",
    "fleet": "fleet_cmd",
}


def main(argv: list | None = None) -> int:  # no typing import: the collect path starts here
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["collect"]:
        from corepipe.commands import collect_cmd

        return collect_cmd.run(argv[1:])
    from corepipe.platform.log import CleanOutput

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = CleanOutput(sys.stdout), CleanOutput(sys.stderr)  # type: ignore[assignment]
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv: list) -> int:
    import argparse
    import importlib
    import os

    from corepipe import __version__
    from corepipe.platform.errors import UserError

    parser = argparse.ArgumentParser(prog="corepipe", description="Collect core dumps from containers.")
    parser.add_argument("--version", action="version", version=f"corepipe {__version__}")
    parser.add_argument("--config", help="config file (default /etc/corepipe/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("collect", help="the kernel's core_pattern handler (run by the kernel, not by hand)")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"corepipe.commands.{module_name}")
        modules[name] = module
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        code = modules[ns.command].run(ns)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
        return code
    except UserError as exc:
        print(f"corepipe {ns.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # nothing left for the exit-time flush to fail on
        os.close(null)
        return 141
    except KeyboardInterrupt:
        return 130
