"""``corepipe fleet``: the index of a fleet's bucket (domain/fleet_index.py): ``reindex`` builds it for crashes an
older shipper uploaded, ``query`` runs SQL on it (domain/fleet_sql.py)."""

from __future__ import annotations

import argparse
import csv
import sys

from corepipe.commands import lookup, output

HELP = "the fleet's index in its bucket: reindex a prefix an older corepipe shipped to, or query it with SQL"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    reindex = sub.add_parser("reindex", help="index the crashes under URL that its index does not name yet "
                                             "(one GET per such record, once)")
    query = sub.add_parser("query", help="run SQL on the table 'crashes' of the index (needs the 'fleet' extra)")
    for action in (reindex, query):
        action.add_argument("--remote", metavar="URL", required=True,
                            help="the destination (az://CONTAINER/PREFIX, s3://BUCKET/PREFIX)")
    query.add_argument("sql", metavar="SQL", help="a DuckDB query, e.g. \"SELECT node, count(*) FROM crashes "
                                                  "GROUP BY node\"")
    query.add_argument("--json", action="store_true", help="one JSON array of objects instead of CSV")


def run(ns: argparse.Namespace) -> int:
    from corepipe.domain import fleet, fleet_sql

    remote = lookup.open_remote(ns.remote)
    with lookup.remote_errors(ns, remote):
        if ns.fleet_command == "reindex":
            return _report(ns.remote, fleet.reindex(remote))
        columns, rows = fleet_sql.query(remote.table(), ns.sql)
    if ns.json:
        output.write_json([dict(zip(columns, row)) for row in rows])
    else:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    return 0


def _report(url: str, indexed: dict) -> int:
    for node, count in sorted(indexed.items()):
        print(f"indexed {count} crashes of {node}")
    if not indexed:
        print(f"every crash under {url} is already in its index")
    return 0
