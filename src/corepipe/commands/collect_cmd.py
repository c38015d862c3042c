"""``corepipe collect``: the kernel's pipe handler.

Runs as root with an empty environment, cwd /, no usable stdout/stderr and the crashed
process held by the kernel. capture.py first takes what needs the process (its /proc files,
its mapped files, a small core) with nothing but ``os`` imported and lets the kernel go;
only then is the rest of corepipe imported and services/collect.py files the crash. It prints
nothing; it logs one line per crash (kernel log and syslog) and an error line for each failure.
Exit codes: 0 stored as configured, 1 something failed (the record says what), 2 bad arguments.
"""

from __future__ import annotations

from corepipe.platform import capture


def run(argv: list) -> int:
    early = capture.take(argv)
    from corepipe.services import collect

    return collect.run(argv, early)
