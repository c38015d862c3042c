"""``corepipe serve``: the resident collector for the kernel's coredump socket (``@@`` / ``@`` patterns) and for
the crashes pipe handlers hand over (``--mode pipe`` on any kernel; docs/forwarding.md).

Runs in the foreground (systemd, a Kubernetes pod, or a shell). Exit codes: 0 stopped by SIGTERM/SIGINT,
1 could not start or a fatal error (the kernel's pattern is then back to the fallback pipe handler).
"""

from __future__ import annotations

import argparse

from corepipe.platform import coredump_socket
from corepipe.platform.errors import UserError
from corepipe.services import install
from corepipe.services.serve import health, server

HELP = ("run the resident collector: on the kernel's coredump socket (Linux 6.16+) and for the crashes the pipe "
        "handler hands over (any kernel; exit 0 stopped, 1 failed)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=coredump_socket.DEFAULT_SOCKET, metavar="PATH",
                        help="where to listen, an absolute path in the host's root (default %(default)s)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="crashes collected at once (default: one per CPU, at least 2)")
    parser.add_argument("--queue-limit", type=int, default=server.QUEUE_LIMIT, metavar="N",
                        help="waiting crashes beyond which the rest get a record without a core (default %(default)s)")
    parser.add_argument("--fallback", metavar="PATTERN",
                        help="kernel.core_pattern to put back on stop (default: the installed pipe handler, "
                             "else the pattern found at start)")
    parser.add_argument("--host-pid", type=int, default=1, metavar="PID",
                        help="a process in the host's mount namespace, from which kernel.core_pattern is written "
                             "(the kernel takes a socket pattern only from there; default %(default)s, the init of "
                             "the node: a pod needs hostPID)")
    parser.add_argument("--run-dir", default=health.RUN_DIR, metavar="DIR",
                        help="where the health file serve.json and the handlers' socket forward.sock go "
                             "(default %(default)s)")
    parser.add_argument("--mode", choices=(server.SOCKET_MODE, server.PIPE_MODE),
                        help="socket: take the kernel's coredump socket (6.16+) and the crashes pipe handlers hand "
                             "over; pipe: leave the kernel's pipe pattern and collect what the handlers hand over, "
                             "on any kernel (default: the installed mode, else socket)")
    parser.add_argument("--forward-wait", type=float, default=server.FORWARD_WAIT, metavar="SECONDS",
                        help="how long a handed-over crash may wait for a worker, the kernel holding the process, "
                             "before it is recorded without its core (default %(default)g)")


def run(ns: argparse.Namespace) -> int:
    config = getattr(ns, "config", None)
    fallback, state = ns.fallback, None
    if fallback is None or ns.mode is None:
        state = install.load_state(install.Paths(config=config or install.Paths.config).state)
    mode = ns.mode or (state or {}).get("mode") or server.SOCKET_MODE
    if fallback is None:
        if state is not None:
            fallback = state.get("fallback_pattern") or (state["pattern"] if state["pattern"].startswith("|")
                                                         else None)
    options = server.Options(socket_path=ns.socket, config=config, workers=ns.workers, queue_limit=ns.queue_limit,
                            run_dir=ns.run_dir, fallback=fallback, host_pid=ns.host_pid, mode=mode,
                            forward_wait=ns.forward_wait)
    try:
        return server.serve(options)
    except (ValueError, OSError) as exc:
        raise UserError(f"{exc}") from None
