"""The ``corepipe`` command line.

``corepipe collect`` is run by the kernel for every crash, so the kernel's call is dispatched before
argparse or any other subcommand is imported: the handler's start-up stays lean. Run by hand, collect
goes through argparse like the others (collect_cmd.from_kernel decides).

Exit codes (all commands): 0 success, 1 failure (one line on stderr says what to do), 2 usage error
(one line too: what is wrong, and where the help is), 130 interrupted, 141 the output pipe was closed
early (``corepipe list | head``: quietly, like a command ended by SIGPIPE); ``status`` adds its own
(see its help). Everything printed goes through log.CleanOutput: no command prints a control
character from a record or a process.
"""

from __future__ import annotations

import sys

#: Subcommand name -> module in corepipe.commands; each has ``HELP``, ``add_arguments(parser)`` and ``run(ns)``.
COMMANDS = {
    "collect": "collect_cmd",
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
    "config": "config_cmd",
    "fleet": "fleet_cmd",
}


def main(argv: list | None = None, forward: str | None = None) -> int:  # no typing import: the collect path
    """``forward``: the socket of a ``corepipe serve`` that ``collect`` hands crashes to (the launcher's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["collect"]:
        from corepipe.commands import collect_cmd

        if collect_cmd.from_kernel(argv[1:]):
            return collect_cmd.collect(argv[1:], forward)
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
    from typing import Any, NoReturn

    from corepipe import __version__
    from corepipe.platform.errors import UserError

    class Parser(argparse.ArgumentParser):
        """A usage error is one line saying what is wrong and where the help is, and exit code 2."""

        def error(self, message: str) -> NoReturn:
            self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            """getopt's rule, as journalctl has it: a long option that takes one value takes the next argument
            even when it starts with '-' (``--since -1h``), where argparse would call it a missing value. What
            follows ``--`` is left alone (``debug -- ARGS`` hands it to the debugger)."""
            args = list(sys.argv[1:] if args is None else args)
            for i in range((args.index("--") if "--" in args else len(args)) - 1, 0, -1):
                action = self._option_string_actions.get(args[i - 1])
                if args[i - 1].startswith("--") and action is not None and action.nargs is None and \
                        args[i].startswith("-"):
                    args[i - 1:i + 1] = [f"{args[i - 1]}={args[i]}"]
            return super().parse_known_args(args, namespace)

    from corepipe.commands import options

    parser = Parser(prog="corepipe", description="Collect core dumps from containers.")
    parser.add_argument("--version", action="version", version=f"corepipe {__version__}")
    parser.add_argument("--config", help="config file (default /etc/corepipe/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = options.parent()  # every command's options: --config after its name as before it
    modules = {}
    named = _named(argv)
    # Only the named command's module (and its imports) when one is named: a command pays for no other's start-up
    # (0.2-0.3 s in all); help, completion and a mistyped name see every command.
    for name, module_name in ({named: COMMANDS[named]} if named in COMMANDS else COMMANDS).items():
        module = importlib.import_module(f"corepipe.commands.{module_name}")
        modules[name] = module
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(command_parser)
    from corepipe.commands import completion_cmd

    completion_cmd.add_arguments(sub.add_parser("completion", parents=[common]))  # no help: hidden; install.sh runs it
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        code = completion_cmd.run(ns, parser) if ns.command == "completion" else modules[ns.command].run(ns)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
        return code
    except UserError as exc:
        print(f"corepipe {ns.command}: error: {exc.line()}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # nothing left for the exit-time flush to fail on
        os.close(null)
        return 141
    except KeyboardInterrupt:
        return 130


def _named(argv: list) -> str | None:
    """The command ``argv`` names: its first word that is neither an option nor the value of ``--config``."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None
