"""The cached fleet index as a SQL table, ``crashes``, in DuckDB (the ``fleet`` extra, imported only here): what
``corepipe fleet query`` runs the user's SQL on.

The table is built from the checked rows in the cache (fleet.IndexCache) whenever the index changed, and kept
in the cache as a DuckDB database: one row per live crash (a crash listed twice keeps the row of the first index
object by key, with a warning; a tombstoned crash is left out, and so are the rows of the objects a compacted
object replaces), with the index schema's columns (docs/shipping.md,
"The fleet index") plus ``dump_time`` (a TIMESTAMP, UTC), and ``crash_groups``, the groups of ``list --group``
without filters. It is opened read-only, without access to files and with its settings locked: a query reads only
these tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Callable, Optional

from corepipe.platform.errors import UserError

#: The index schema as DuckDB types (rows are checked before they are cached, so they have these types).
COLUMNS = {
    "v": "INTEGER", "kind": "VARCHAR", "id": "VARCHAR", "node": "VARCHAR", "time": "VARCHAR",
    "timestamp": "DOUBLE", "received": "DOUBLE", "status": "VARCHAR", "pid": "BIGINT", "uid": "BIGINT",
    "exe": "VARCHAR", "comm": "VARCHAR", "hostname": "VARCHAR",
    "signal": "STRUCT(number INTEGER, name VARCHAR)",
    "container": "STRUCT(runtime VARCHAR, id VARCHAR, name VARCHAR, image VARCHAR, pod_name VARCHAR, "
                 "pod_namespace VARCHAR, pod_uid VARCHAR, confidence VARCHAR)",
    "signature": "STRUCT(hash VARCHAR, text VARCHAR, algorithm VARCHAR, version INTEGER, source VARCHAR, "
                 "site VARCHAR)",
    "core": "STRUCT(stored BOOLEAN, file VARCHAR, size UBIGINT, compressed_size UBIGINT, truncated BOOLEAN, "
            "complete BOOLEAN, digest VARCHAR)",
    "core_state": "VARCHAR",
    "batch": "STRUCT(pool VARCHAR, job VARCHAR, task VARCHAR, node VARCHAR, confirmed BOOLEAN, source VARCHAR)",
    "keys": "STRUCT(record STRUCT(key VARCHAR, size UBIGINT), core STRUCT(key VARCHAR, size UBIGINT), "
            "binaries STRUCT(key VARCHAR, size UBIGINT)[])",
    "corepipe": "VARCHAR",
}


#: The tables a cached database holds; a database built by a corepipe with another layout is not used (the state
#: in its name differs) and is removed as any earlier one.
_LAYOUT = 2
#: The order of ``list --group``'s rows.
_GROUP_ORDER = "count DESC, last_seen, hash"


class QueryError(UserError):
    """The extra is missing, or DuckDB refused the query; the message is one line."""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(directory: str, objects: dict, warn: Callable[[str], None]):  # -> duckdb.DuckDBPyConnection
    """A read-only DuckDB database with the ``crashes`` table of the cache ``directory``; ``objects`` is the
    cache's manifest (index object key -> {file, etag, size}). The database is kept in the cache, named by the
    objects it was built from, so a command over an unchanged index opens it and reads nothing else."""
    try:
        import duckdb
    except ImportError:
        from corepipe.platform import extras

        raise QueryError(f"reading a fleet's index needs {extras.missing('fleet', 'duckdb')}") from None
    state = json.dumps([_LAYOUT, sorted((k, v.get("file"), v.get("etag"), v.get("size")) for k, v in objects.items())])
    path = os.path.join(directory, f"crashes-{hashlib.sha256(state.encode()).hexdigest()[:24]}.duckdb")
    try:
        return _open(duckdb, path, directory, objects, warn)
    except duckdb.Error as exc:
        raise QueryError(f"the index cache {directory} cannot be used ({str(exc).splitlines()[0][:200]}); it is "
                         "safe to delete") from None


def _open(duckdb, path: str, directory: str, objects: dict, warn: Callable[[str], None]):  # noqa: ANN001
    settings = {"threads": 2, "memory_limit": "160MB"}
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".crashes-", suffix=".duckdb")
        os.close(fd)
        os.unlink(tmp)  # DuckDB creates the file itself
        try:
            con = duckdb.connect(tmp, config=settings)
            try:
                _build(con, directory, objects, warn)
            finally:
                con.close()
            os.replace(tmp, path)
        finally:
            for leftover in (tmp, tmp + ".wal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        for name in os.listdir(directory):  # the databases of earlier states of the index
            if re.fullmatch(r"crashes-[0-9a-f]{24}\.duckdb", name) and os.path.join(directory, name) != path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
    con = duckdb.connect(path, read_only=True, config=settings)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _load(con, directory: str, objects: dict) -> None:  # noqa: ANN001
    """The temp table ``everything``: every cached row, with ``object``, the key of the index object it is in."""
    extra = {"deleted": "DOUBLE", "objects": "VARCHAR[]"}  # of tombstones and of a compacted object's first row
    columns = "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in {**COLUMNS, **extra}.items()) + "}"
    con.execute("CREATE TEMP TABLE objects (key VARCHAR, file VARCHAR)")
    files = [(key, os.path.join(directory, seen["file"])) for key, seen in sorted(objects.items())]
    if files:
        con.executemany("INSERT INTO objects VALUES (?, ?)", files)
        source = (f"SELECT r.*, o.key AS object FROM read_json([{', '.join(_literal(f) for _k, f in files)}], "
                  f"format = 'newline_delimited', columns = {columns}, filename = 'source') r "
                  "JOIN objects o ON r.source = o.file")
    else:
        source = f"SELECT {', '.join(f'NULL::{t} AS {n}' for n, t in COLUMNS.items())}, NULL::VARCHAR AS object, " \
                 "NULL::DOUBLE AS deleted, NULL::VARCHAR[] AS objects WHERE false"
    con.execute(f"CREATE TEMP TABLE everything AS {source}")


def _build(con, directory: str, objects: dict, warn: Callable[[str], None]) -> None:  # noqa: ANN001
    _load(con, directory, objects)
    # A compacted object's rows stand for the objects of its partition it names, which may still be listed (they are
    # deleted after it is written and read back): their rows are left out, so no crash is counted twice.
    con.execute("""CREATE TEMP TABLE raw AS SELECT * FROM everything WHERE object NOT IN (
        SELECT regexp_replace(object, '[^/]*$', '') || unnest(objects) FROM everything WHERE kind = 'replaces')""")
    for node, crash, count, first in con.execute(
            "SELECT node, id, count(*), min(object) FROM raw WHERE kind = 'crash' GROUP BY node, id "
            "HAVING count(*) > 1 ORDER BY node, id").fetchall():
        warn(f"crash {node}/{crash} is in the index {count} times; the row of {first} is used")
    con.execute(f"""CREATE TABLE crashes AS
        WITH dead AS (SELECT DISTINCT node, id FROM raw WHERE kind = 'tombstone')
        SELECT {', '.join(COLUMNS)}, make_timestamp(CAST(round(timestamp * 1e6) AS BIGINT)) AS dump_time
        FROM raw
        WHERE kind = 'crash' AND NOT EXISTS (SELECT 1 FROM dead WHERE dead.node = raw.node AND dead.id = raw.id)
        QUALIFY row_number() OVER (PARTITION BY node, id ORDER BY object) = 1""")
    # The fleet's groups without filters, what a warm ``list --remote --group`` shows (0.2-0.3 s of DuckDB at
    # 100,000 crashes, paid once per state of the index instead of per command).
    con.execute(f"CREATE TABLE crash_groups AS {_grouped({}, None)[0]}")


def query(con, sql: str) -> tuple:  # noqa: ANN001 - a DuckDB connection, imported lazily
    """(column names, rows) of ``sql``; QueryError with DuckDB's first line when it refuses it."""
    import duckdb

    try:
        cursor = con.execute(sql)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0][:300]) from None


#: The order of ``catalog.crash_order``: dump time, then when the collector took it, then id.
_ORDER = "coalesce(timestamp, 0), coalesce(received, timestamp, 0), id"
_NEWEST_FIRST = "coalesce(timestamp, 0) DESC, coalesce(received, timestamp, 0) DESC, id DESC"


def _keyed(source: str) -> str:
    """``source``'s rows with ``group_key``, as ``signature.keys`` computes it: a crash-site signature joins the
    backtrace signature of the same site when there is exactly one among ``source``'s rows."""
    return f"""(WITH src AS ({source}),
        sites AS (SELECT signature.site AS site, min(signature.hash) AS hash, count(DISTINCT signature.hash) AS n
                  FROM src WHERE signature.source = 'backtrace' AND signature.site IS NOT NULL
                  AND coalesce(signature.hash, '') <> '' GROUP BY 1)
        SELECT src.*, CASE WHEN src.signature.source = 'crash site' AND sites.n = 1 THEN sites.hash
                           ELSE coalesce(nullif(src.signature.hash, ''), '-') END AS group_key
        FROM src LEFT JOIN sites ON src.signature.site = sites.site)"""


def _conditions(filters: dict) -> tuple:
    """(SQL condition, parameters) of ``list``'s filters (list_cmd.matches, as SQL)."""
    where, params = ["true"], []
    if filters.get("node") is not None:
        where.append("node = ?")
        params.append(filters["node"])
    if filters.get("container") is not None:
        where.append("(? IN (container.name, container.id) OR starts_with(container.id, ?))")
        params += [filters["container"]] * 2
    for name, column in (("pod", "container.pod_name"), ("namespace", "container.pod_namespace"),
                         ("job", "batch.job"), ("task", "batch.task")):
        if filters.get(name) is not None:
            where.append(f"{column} = ?")
            params.append(filters[name])
    if filters.get("image") is not None:  # the reference itself, or its name without the tag
        where.append("(container.image = ? OR (regexp_matches(split_part(container.image, '@', 1), ':[^/:]*$') AND "
                     "regexp_replace(split_part(container.image, '@', 1), ':[^/:]*$', '') = ?))")
        params += [filters["image"]] * 2
    if filters.get("since") is not None:
        where.append("coalesce(timestamp, 0) >= ?")
        params.append(filters["since"])
    if filters.get("until") is not None:
        where.append("coalesce(timestamp, 0) <= ?")
        params.append(filters["until"])
    wanted = filters.get("signal")  # list_cmd.signal_filter's: a number, or the signal's name (SIGSEGV)
    if isinstance(wanted, int):
        where.append("signal.number = ?")
        params.append(wanted)
    elif wanted is not None:
        where.append("signal.name = ?")
        params.append(wanted)
    if filters.get("exe") is not None:
        where.append("? IN (exe, regexp_extract(exe, '[^/]*$'), comm)")
        params.append(filters["exe"])
    return " AND ".join(where), params


def _matching(filters: dict, last: Optional[int], columns: str = "*") -> tuple:
    """(SQL, parameters) of the rows ``list``'s filters keep (their ``columns`` of the table), with ``group_key``;
    ``filters["signature"]`` is a hash prefix or a signature's text, matched on the grouping key over the whole
    fleet. Sorted (newest first) only to keep the ``last`` newest: the callers order what they return."""
    where, params = _conditions(filters)
    wanted = filters.get("signature")
    if wanted is not None:
        where += (" AND ? <> '' AND (starts_with(group_key, lower(?)) OR group_key IN "
                  "(SELECT group_key FROM everything WHERE signature.text = ? AND signature.hash = group_key))")
        params += [wanted] * 3
    limit = "" if last is None else f"ORDER BY {_NEWEST_FIRST} LIMIT {max(0, int(last))}"
    return (f"""WITH everything AS {_keyed(f'SELECT {columns} FROM crashes')}
        SELECT * FROM everything WHERE {where} {limit}""", params)


def _rows(cursor) -> Iterator[dict]:  # noqa: ANN001
    """The cursor's rows as dicts, a thousand at a time (a fleet's listing is never all in memory at once)."""
    names = [d[0] for d in cursor.description]
    while True:
        batch = cursor.fetchmany(1000)
        if not batch:
            return
        for row in batch:
            value = dict(zip(names, row))
            if isinstance(value["timestamp"], float) and value["timestamp"].is_integer():
                value["timestamp"] = int(value["timestamp"])  # DOUBLE in the table; whole seconds as in the record
            yield value


def crashes_matching(con, filters: dict, last: Optional[int] = None) -> Iterator[dict]:  # noqa: ANN001
    """The rows (dicts of the index schema) that ``list``'s filters keep, oldest first (the last ``last``)."""
    sql, params = _matching(filters, last)
    return _rows(con.execute(f"SELECT {', '.join(COLUMNS)} FROM ({sql}) ORDER BY {_ORDER}", params))


def find(con, node: Optional[str], prefix: Optional[str]) -> list:  # noqa: ANN001
    """The rows whose id starts with ``prefix`` (of ``node`` only, if given), oldest first; the latest alone
    when ``prefix`` is None."""
    if prefix is None:
        sql = f"SELECT {', '.join(COLUMNS)} FROM crashes WHERE ? IS NULL OR node = ? ORDER BY {_NEWEST_FIRST} LIMIT 1"
        return list(_rows(con.execute(sql, [node, node])))
    sql = (f"SELECT {', '.join(COLUMNS)} FROM crashes WHERE (? IS NULL OR node = ?) AND starts_with(id, lower(?)) "
           f"ORDER BY {_ORDER} LIMIT 1000")
    return list(_rows(con.execute(sql, [node, node, prefix])))


def _grouped(filters: dict, last: Optional[int]) -> tuple:
    """(SQL, parameters) of ``groups``."""
    # Only the columns a group shows or a filter reads (DuckDB then reads no others: a third of the time and
    # memory), and the crash order as a sortable value, not a sort of every row.
    sql, params = _matching(filters, last, "id, node, time, timestamp, received, signature, container, core, "
                                           "exe, comm, signal, batch")
    return f"""WITH kept AS ({sql}),
        keyed AS {_keyed('SELECT * EXCLUDE (group_key) FROM kept')},
        ordered AS (SELECT *, ({_ORDER}) AS ord,
                    CASE WHEN container.runtime = 'host' THEN 'host'
                         ELSE coalesce(container.name, container.id, container.runtime) END AS shown
                    FROM keyed)
        SELECT coalesce(arg_min(signature.text, ord) FILTER (WHERE signature.hash = group_key), '-') AS signature,
               group_key AS hash,
               arg_min(signature.source, ord) FILTER (WHERE signature.hash = group_key) AS source,
               count(*) AS count, count(*) FILTER (WHERE core.stored) AS cores,
               arg_min(time, ord) AS first_seen, arg_max(time, ord) AS last_seen,
               list(DISTINCT shown ORDER BY shown) FILTER (WHERE coalesce(shown, '') <> '') AS containers,
               list(DISTINCT container.image ORDER BY container.image)
                   FILTER (WHERE coalesce(container.image, '') <> '') AS images,
               list(DISTINCT node ORDER BY node) AS nodes,
               coalesce(arg_min(id, ord) FILTER (WHERE signature.hash = group_key), arg_min(id, ord)) AS sample,
               arg_min(timestamp, ord) AS first_timestamp
        FROM ordered GROUP BY group_key ORDER BY {_GROUP_ORDER}""", params


def groups(con, filters: dict, last: Optional[int] = None) -> list:  # noqa: ANN001
    """One dict per signature of the crashes ``crashes_matching`` keeps, as ``signature.groups`` gives them
    (``containers``, ``images`` and ``nodes`` sorted), the most crashes first; without filters, the table
    ``crash_groups`` built with the database."""
    if last is None and all(value is None for value in filters.values()):
        cursor = con.execute(f"SELECT * FROM crash_groups ORDER BY {_GROUP_ORDER}")
    else:
        cursor = con.execute(*_grouped(filters, last))
    names = [d[0] for d in cursor.description]
    return [{**dict(zip(names, row)), "containers": row[7] or [], "images": row[8] or []}
            for row in cursor.fetchall()]


def expired(con, before: Optional[float], keep: Optional[int]) -> tuple:  # noqa: ANN001
    """(rows, binary keys) of ``prune --remote``: the crashes dumped before ``before`` (any age when None) that are
    not among the ``keep`` newest of their signature (grouped as ``list --group`` groups; all of them when None),
    oldest first, and the ``.build-id`` keys that they name and no other crash does."""
    condition = ("(? IS NULL OR coalesce(timestamp, 0) < ?) AND (? IS NULL OR row_number() OVER "
                 f"(PARTITION BY group_key ORDER BY {_NEWEST_FIRST}) > ?)")
    params = [before, before, keep, keep]
    flagged = f"SELECT *, {condition} AS doomed FROM {_keyed('SELECT * FROM crashes')}"
    rows = list(_rows(con.execute(f"SELECT {', '.join(COLUMNS)} FROM ({flagged}) WHERE doomed ORDER BY {_ORDER}",
                                  params)))
    unused = con.execute(f"""SELECT saved.key FROM (SELECT doomed, unnest(keys.binaries) AS saved FROM ({flagged}))
        GROUP BY saved.key HAVING bool_and(doomed) ORDER BY 1""", params).fetchall()
    return rows, [key for (key,) in unused]


def census(directory: str, objects: dict, planned: Optional[dict] = None) -> list:
    """What ``prune --remote`` needs to know of every cached index object (``objects``: the cache's manifest), as
    ``(key, crashes, live, tombstones, needed)``: its crash rows, those of them no tombstone anywhere in the index
    hides, its tombstone rows, and those of them that hide a crash row still in some index object (the objects a
    compacted one replaces included: they are still there). ``planned``: tombstone objects not written (a dry
    run's), key -> [(node, id)] of their tombstones, counted as if they were in the index."""
    import duckdb

    try:
        con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "160MB"})
    except duckdb.Error as exc:
        raise QueryError(f"cannot open DuckDB ({str(exc).splitlines()[0][:200]})") from None
    try:
        _load(con, directory, objects)
        for key, crashes in (planned or {}).items():
            con.execute("INSERT INTO objects VALUES (?, NULL)", [key])
            con.executemany("INSERT INTO everything (object, kind, node, id) VALUES (?, 'tombstone', ?, ?)",
                            [(key, node, crash) for node, crash in crashes])
        return con.execute("""
            WITH dead AS (SELECT DISTINCT node, id FROM everything WHERE kind = 'tombstone'),
                 named AS (SELECT DISTINCT node, id FROM everything WHERE kind = 'crash'),
                 flagged AS (SELECT e.object, e.kind, d.id IS NOT NULL AS hidden, n.id IS NOT NULL AS hides
                             FROM everything e LEFT JOIN dead d ON d.node = e.node AND d.id = e.id
                             LEFT JOIN named n ON n.node = e.node AND n.id = e.id)
            SELECT o.key, count(f.kind) FILTER (WHERE f.kind = 'crash'),
                   count(f.kind) FILTER (WHERE f.kind = 'crash' AND NOT f.hidden),
                   count(f.kind) FILTER (WHERE f.kind = 'tombstone'),
                   count(f.kind) FILTER (WHERE f.kind = 'tombstone' AND f.hides)
            FROM objects o LEFT JOIN flagged f ON f.object = o.key GROUP BY o.key ORDER BY o.key""").fetchall()
    except duckdb.Error as exc:
        raise QueryError(f"the index cache {directory} cannot be used ({str(exc).splitlines()[0][:200]}); it is "
                         "safe to delete") from None
    finally:
        con.close()
