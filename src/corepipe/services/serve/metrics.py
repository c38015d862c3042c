"""The resident collector's metrics child: the Prometheus endpoint (config ``metrics_listen``) in a process of its
own, so the accept loop stays one thread (it forks workers, and a fork must not copy another thread's locks) and
a scrape, which walks the store, never delays a crash."""

from __future__ import annotations

import os
import signal
from typing import Optional

from corepipe.platform import config as configuration
from corepipe.platform import libc
from corepipe.platform.log import ERR, INFO, WARNING, log
from corepipe.services.serve.health import read_health
from corepipe.services.serve.worker import Prepared


def start(config: Optional[str], run_dir: str) -> tuple:
    """Fork the metrics process and wait until it listens or says why not: (its pid, the address it serves), or
    (None, None). A missing prometheus-client or a port in use is logged, never fatal: collecting crashes comes
    first."""
    cfg = Prepared(config).cfg
    if not cfg.metrics_listen:
        return None, None
    try:
        from corepipe.services import metrics  # noqa: F401 - here, to say at start that it is missing
    except ImportError as exc:
        from corepipe.platform import extras

        log(f"error: serve: no metrics endpoint: it needs {extras.missing('metrics', str(exc.name))} "
            "(or set metrics_listen = \"\")", ERR)
        return None, None
    host, port = configuration.listen_address(cfg.metrics_listen)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            code = _process(host, port, config, run_dir, parent, ready_w)
        except BaseException as exc:  # noqa: BLE001 - a child reports, it never unwinds into the loop
            log(f"error: serve metrics: {type(exc).__name__}: {exc}", ERR)
        finally:
            os._exit(code)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        answer = ready.read(4096).decode("utf-8", "replace")
    if not answer.startswith("port "):
        os.waitpid(pid, 0)
        log(f"error: serve: no metrics endpoint: {answer or 'the metrics process died'}", ERR)
        return None, None
    address = configuration.join_address(host, int(answer.split()[1]))
    if not configuration.is_loopback(host):
        log(f"serve: metrics on {host}, not loopback: anyone who reaches it sees container names and images",
            WARNING)
    log(f"serve: metrics on http://{address}/metrics (pid {pid})", INFO)
    return pid, address


def _process(host: str, port: int, config: Optional[str], run_dir: str, parent: int, ready: int) -> int:
    """The metrics process: the metrics endpoint (its event loop's thread is this process's own), the store's
    metrics under the config as the file is now, and the server's counters from its health file. It ends
    with the server (SIGKILL on the parent's death, whatever kills it)."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        return 1
    from corepipe.services import metrics

    prepared = Prepared(config, keys=None)  # every key: ship_to gives the shipping backlog's metrics
    try:
        _server, thread, port = metrics.listen(host, port, lambda: prepared.current()[0],
                                               [metrics.ServerCollector(lambda: read_health(run_dir))])
    except OSError as exc:
        os.write(ready, f"cannot listen on {host}:{port}: {exc.strerror or exc}; set metrics_listen to a free "
                        "[HOST:]PORT, or \"\" for none".encode())
        return 1
    os.write(ready, f"port {port}".encode())
    os.close(ready)
    thread.join()
    return 0
