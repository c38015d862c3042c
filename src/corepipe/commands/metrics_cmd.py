"""``corepipe metrics``: the store's Prometheus metrics, printed, as a node_exporter textfile, or served."""

from __future__ import annotations

import argparse
import os
import sys

from corepipe.commands import options
from corepipe.platform import config as configuration
from corepipe.platform import extras
from corepipe.platform.errors import UserError

HELP = ("Prometheus metrics of the store: print them, write them for node_exporter's textfile collector "
        "(--textfile DIR), or serve them on /metrics (--listen [HOST:]PORT, 127.0.0.1 by default); "
        "needs the 'metrics' extra (prometheus-client)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--textfile", metavar="DIR", help="write DIR/corepipe.prom (atomically: renamed into place)")
    where.add_argument("--listen", metavar="[HOST:]PORT",
                       help="serve the metrics over HTTP until killed (HOST defaults to 127.0.0.1)")


def run(ns: argparse.Namespace) -> int:
    try:
        from corepipe.services import metrics
    except ImportError as exc:
        raise UserError(f"metrics need {extras.missing('metrics', str(exc.name))}") from None
    cfg = options.config(ns)
    if ns.textfile is not None:
        if not os.path.isdir(ns.textfile):
            raise UserError(f"{ns.textfile} is not a directory: give node_exporter's --collector.textfile.directory")
        try:
            metrics.write_textfile(ns.textfile, cfg)
        except OSError as exc:
            raise UserError(f"cannot write {ns.textfile}/{metrics.TEXTFILE} from the store {cfg.store}: "
                            f"{exc.strerror or exc} (run as root)") from None
        return 0
    if ns.listen is not None:
        return _serve(metrics, ns.listen, cfg)
    try:
        body, _content_type = metrics.render(cfg)
    except OSError as exc:
        raise UserError(f"cannot read the store {cfg.store}: {exc.strerror or exc} (run as root)") from None
    sys.stdout.write(body.decode())
    return 0


def _serve(metrics, address: str, cfg: configuration.Config) -> int:  # metrics: the module, imported late
    try:
        host, port = configuration.listen_address(address)
    except ValueError as exc:
        raise UserError(f"--listen: {exc}") from None
    try:
        _server, thread, port = metrics.listen(host, port, cfg)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --listen") from None
    if not configuration.is_loopback(host):
        print(f"corepipe metrics: warning: serving on {host}, not loopback: anyone who reaches it sees "
              "container names and images", file=sys.stderr)
    print(f"corepipe metrics: serving http://{configuration.join_address(host, port)}/metrics", file=sys.stderr,
          flush=True)
    thread.join()
    return 0
