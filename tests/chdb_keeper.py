"""ClickHouse's engine (chdb) with a Keeper, in a child process, for the S3Queue/AzureQueue ingest of
install/fleet/clickhouse-queue.sql: ``KeeperEngine(workdir).query(sql)`` runs one statement in a persistent
database whose background tasks (S3Queue's polling, its materialized view) keep running between queries.

The Keeper is ClickHouse's in-memory test implementation (``<zookeeper><implementation>testkeeper``), given
through the connection's ``config-file``. The child loads chdb's extension without running chdb/__init__.py:
that file opens a connection for ``SELECT version()`` and closes it (chdb 4.4), and closing shuts down
ClickHouse's process-wide registry of streaming tables for good, so every S3Queue table created later in that
process fails with "Code: 49. DB::Exception: Shutdown was called. (LOGICAL_ERROR)" (its registerTable). A
process that has imported chdb (the test's own, for the s3() definitions) therefore cannot host the queue.

Run as a script (``chdb_keeper.py DATABASE CONFIG``) it is the child: one JSON request per line on stdin
(``{"sql": ..., "format": ...}``), one JSON answer per line on stdout (``{"result": ...}`` or ``{"error": ...}``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import read_line

CONFIG = "<clickhouse><zookeeper><implementation>testkeeper</implementation></zookeeper></clickhouse>\n"


class EngineError(AssertionError):
    """A statement the engine refused, with ClickHouse's message."""


class KeeperEngine:
    """A chdb database under ``workdir`` with an in-memory Keeper, in a child process stopped by ``close()``."""

    def __init__(self, workdir: Path):
        config = workdir / "chdb-keeper.xml"
        config.write_text(CONFIG)
        self.proc = subprocess.Popen([sys.executable, __file__, str(workdir / "chdb-keeper"), str(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def query(self, sql: str, fmt: str = "JSONEachRow") -> str:
        """The output of ``sql`` in ``fmt``; EngineError if ClickHouse refuses it."""
        self.proc.stdin.write(json.dumps({"sql": sql, "format": fmt}) + "\n")
        self.proc.stdin.flush()
        line = read_line(self.proc.stdout, timeout=240)  # an s3() query retries an unreachable server for long
        if not line:
            raise EngineError(f"the chdb child exited ({self.proc.wait()}) running: {sql[:200]}")
        answer = json.loads(line)
        if "error" in answer:
            raise EngineError(f"{answer['error']} (running: {sql[:200]})")
        return answer["result"]

    def rows(self, sql: str) -> list:
        return [json.loads(line) for line in self.query(sql).splitlines()]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _connect(database: str, config: str):
    """A chdb connection loaded the way chdb/__init__.py loads its engine, minus its closing probe."""
    import ctypes
    import importlib
    import importlib.util
    import os
    import types

    spec = importlib.util.find_spec("chdb")  # finds the package without running its __init__
    package = types.ModuleType("chdb")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["chdb"] = package
    for where in package.__path__:  # chdb/__init__.py preloads the engine with RTLD_DEEPBIND: so do we
        if os.path.exists(os.path.join(where, "_chdb.abi3.so")):
            ctypes.CDLL(os.path.join(where, "_chdb.abi3.so"), mode=sys.getdlopenflags() | os.RTLD_DEEPBIND)
            break
    engine = importlib.import_module("chdb._chdb")
    return engine.connect(f"file:{database}?config-file={config}")


def _serve(database: str, config: str) -> None:
    connection = _connect(database, config)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer = {"result": connection.query(request["sql"], request["format"]).bytes().decode()}
            except Exception as exc:  # noqa: BLE001 - ClickHouse's message goes back to the test
                answer = {"error": str(exc)}
            print(json.dumps(answer), flush=True)
    finally:
        connection.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
