"""``corepipe collect``: the kernel's pipe handler.

Runs as root with an empty environment, cwd /, no usable stdout/stderr and the crashed
process held by the kernel. When ``corepipe serve`` runs, the handler hands it the crash
(platform/forward.py: the kernel's pipe, the pidfd and these arguments) and exits; the server's
worker collects it while the kernel still holds the process. Otherwise (no server, no answer
in time, a busy server) it collects the crash itself: capture.py first takes what needs the
process (its /proc files, its mapped files, a small core) with nothing but ``os`` imported and
lets the kernel go; only then is the rest of corepipe imported and services/collect.py files
the crash. It prints nothing; it logs one line per crash (kernel log and syslog) and an error
line for each failure. Exit codes: 0 stored as configured (or handed to the server), 1 something
failed (the record says what), 2 bad arguments.

Run by hand (``from_kernel`` is false) it files nothing: cli.py sends it through argparse like any
other command, which prints its help for ``--help`` and the one-line usage error of ``run`` otherwise.
"""

from __future__ import annotations

import os

from corepipe.platform import capture

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (as in capture.py)
if TYPE_CHECKING:
    import argparse

HELP = "the kernel's core_pattern handler (run by the kernel for each crash, not by hand)"


def from_kernel(argv: list) -> bool:
    """Whether ``collect ARGV`` is the kernel's call: arguments after ``[--config PATH]`` whose first is not an
    option (the kernel's is a PID, %P: ``--help`` or ``--version`` there is a person), and a stdin that is not
    a terminal (the kernel's is the core's pipe). Only then is a crash filed, so a person trying
    ``corepipe collect --help`` cannot make the store's latest crash."""
    rest = argv[2:] if argv[:1] == [capture.CONFIG_OPTION] else argv
    return bool(rest) and not rest[0].startswith("-") and not os.isatty(capture.STDIN)


def collect(argv: list, forward: str | None = None) -> int:
    """File the crash the kernel's ``argv`` describe, its core on stdin; or hand it to the server listening on
    ``forward`` (the launcher's; None: collect here, always)."""
    if forward is not None:
        from corepipe.platform import forward as handoff

        if handoff.handoff(argv, forward):
            return 0
    early = capture.take(argv)
    from corepipe.services import collect

    return collect.run(argv, early)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import argparse  # here, not on the kernel's path

    from corepipe.platform import kernel

    parser.description = (
        f"The handler the kernel runs for every crash, installed by 'corepipe install' as kernel.core_pattern = "
        f"'|/usr/local/bin/corepipe collect [--config PATH] {' '.join(kernel.SPECIFIERS)}', with the core on stdin. "
        "It prints nothing and logs to the kernel log and syslog. Run by hand (no kernel arguments, a terminal "
        "on stdin, or --help) it files nothing. Exit codes: 0 stored as configured, 1 something failed (the "
        "record says what), 2 bad arguments or not run by the kernel.")
    parser.add_argument("kernel_args", nargs=argparse.REMAINDER, metavar="%P %p ...",
                        help="the kernel's arguments, in the order above")


def run(ns: argparse.Namespace) -> int:
    """Reached only when ``from_kernel`` said no (or with ``corepipe --config X collect``): file nothing."""
    from corepipe.platform.errors import UsageError

    raise UsageError("not run by the kernel (it passes the crash's %-arguments and the core on a pipe): "
                     "nothing was filed; 'corepipe install' makes the kernel run collect, "
                     "'corepipe collect --help' says more")
