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
"""

from __future__ import annotations

from corepipe.platform import capture


def run(argv: list, forward: str | None = None) -> int:
    """``forward``: the server's handoff socket (None: collect here, always)."""
    if forward is not None:
        from corepipe.platform import forward as handoff

        if handoff.handoff(argv, forward):
            return 0
    early = capture.take(argv)
    from corepipe.services import collect

    return collect.run(argv, early)
