"""Prometheus metrics of a store, through the official ``prometheus-client`` (the optional extra ``metrics``).

Every figure is derived from the store's records when it is scraped, not counted in a process, so the
counters survive restarts and the collect path (one short process per crash) never loads this module:
``corepipe_crashes_total`` is the number of records, by runtime, container name and image, pod and signal.
Removing records (``prune``, ``rm``) lowers a counter, which Prometheus reads as a counter reset (the alert
rules in install/monitoring/ allow for it).

Names follow Prometheus' conventions: units and ``_total`` in names, text in an ``_info`` metric, and no label
that a scrape's target labels carry (``job``, ``instance``, and Kubernetes' ``container``, ``pod``,
``namespace``, ``node``): a clash would rename ours to ``exported_*``. Label values are cleaned (one
printable line, cut): they come from names a crashed process chose.

Scrapes stay cheap and bounded whatever the store holds (a record can be 1 MiB of hostile text): the endpoint
keeps a few hundred bytes of each record and reads a record again only when it changed, and reuses a result
while the store's generation is unchanged (``StoreCollector``); only confirmed containers name a series.

Entry points: ``render(cfg, extra)`` (the exposition bytes and content type of one scrape),
``write_textfile(directory, cfg)`` (node_exporter's textfile collector) and ``listen(host, port, cfg, extra)``
(an HTTP endpoint on one event loop in a thread, with timeouts: ``corepipe metrics --listen``, and the
resident collector's metrics process, services/serve/metrics.py). ``extra`` takes more prometheus-client collectors:
the server adds its own counters (``ServerCollector``). With ``ship_to`` configured, the shipping backlog
comes from the same walk of the records (no second one) and the shipper's ship-status.json.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Callable, Optional, Union

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, write_to_textfile
from prometheus_client.registry import Collector

from corepipe.domain import books, catalog, policy, signature
from corepipe.platform import fs
from corepipe.platform.config import Config
from corepipe.platform.log import clean

TEXTFILE = "corepipe.prom"
OTHER = "other"
#: Seconds; collect's duration is mostly the core's size over the compression speed.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
MAX_TITLE = 120
MAX_LABEL = 100
MAX_TEXT = 512
UNCONFIRMED = "unconfirmed"
#: Seconds a computed scrape is reused whatever changed, and at most while the store's generation is unchanged.
FRESH, STALE = 5.0, 60.0
#: Seconds a signature counts as new: the window of the CorepipeNewCrashSignature alert (install/monitoring/).
NEW_SIGNATURE = 3600
#: The HTTP endpoint's bounds: seconds to send a request or take the answer, open connections, request head bytes.
TIMEOUT, MAX_CONNECTIONS, MAX_REQUEST = 10.0, 32, 16 << 10
#: Policy groups with a ``corepipe_records_dropped_total`` series of their own (the most first); the rest: other.
MAX_DROPPED_GROUPS = 20
#: The crash counter's labels: never a target label (see the module's docstring).
CRASH_LABELS = ["runtime", "container_name", "container_image", "pod_namespace", "pod_name", "signal"]

#: core.reason -> (outcome, reason label); the first match wins. Reasons carry figures, labels must not.
_OUTCOMES = [
    (re.compile(r"rate limited: \d+ cores of this (container|executable|signature)"), "rate_limited", None),
    (re.compile(r"RLIMIT_CORE is 0"), "rejected", "rlimit_core_zero"),
    (re.compile(r"no room for the core"), "rejected", "no_room"),
    (re.compile(r"^storm: "), "rejected", "storm"),
    (re.compile(r"the collector was saturated"), "rejected", "saturated"),
    (re.compile(r"coredump socket: "), "failed", "socket"),
    (re.compile(r"storage accounting failed"), "failed", "accounting"),
    (re.compile(r"write failed"), "failed", "write"),
    (re.compile(r"the kernel sent no core data"), "failed", "empty"),
]
_DELETED = re.compile(r"deleted: .*?(container_max_cores|container_max_bytes|max_use|keep_free)")


def outcome(rec: dict) -> tuple:
    """(outcome, reason) of a record's core, both from small fixed sets: stored (reason ``whole``,
    ``truncated``, ``partial`` or ``deleted_<limit>`` when deleted later), rate_limited (container,
    executable, signature), rejected (``rlimit_core_zero``, ``no_room``, ``storm``, ``saturated``), failed,
    collecting."""
    core = rec.get("core") or {}
    reason = str(core.get("reason") or "")
    if rec.get("status") == "collecting":
        return "collecting", "collecting"
    if core.get("stored"):
        return "stored", "truncated" if core.get("truncated") else "whole" if core.get("complete") else "partial"
    if reason.startswith("deleted:"):
        found = _DELETED.search(reason)
        return "stored", f"deleted_{found.group(1)}" if found else "deleted_other"
    for pattern, what, label in _OUTCOMES:
        found = pattern.search(reason)
        if found:
            return what, label or found.group(1)
    return ("failed" if rec.get("status") == "failed" else "rejected"), "other"


def label(value: object, limit: int = MAX_LABEL) -> str:
    """A label value from record text: one printable line of at most ``limit`` characters (a name that is not
    UTF-8 would make the whole exposition fail to encode)."""
    return clean(str(value) if value is not None else "", limit)


def _container_labels(container: dict) -> list:
    """runtime, container_name, container_image, pod_namespace, pod_name. A container the runtime's state did
    not confirm (the policy's rule, model.Container.policy_group) is ``unconfirmed``: an id or name a process
    forged must not make a series of its own."""
    runtime = label(container.get("runtime") or "unknown")
    if runtime == "host":
        return ["host", "host", "", "", ""]
    if container.get("confidence") != "certain":
        return [runtime, UNCONFIRMED, "", "", ""]
    name = container.get("name") or str(container.get("id") or "")[:12] or runtime
    return [runtime, label(name), label(container.get("image")), label(container.get("pod_namespace")),
            label(container.get("pod_name"))]


def _part(value: object, keys: tuple) -> dict:
    """The ``keys`` of a record's sub-object, text cut to MAX_TEXT (the metrics never show more)."""
    value = value if isinstance(value, dict) else {}
    return {k: value[k][:MAX_TEXT] if isinstance(value.get(k), str) else value.get(k) for k in keys if k in value}


def slim(rec: dict) -> dict:
    """What the metrics use of a record: a few hundred bytes, whatever the record's size (up to 1 MiB of
    command line, mapped files and binaries)."""
    kept = {k: rec.get(k) for k in ("id", "status", "time", "timestamp", "received")}
    kept["signal"] = _part(rec.get("signal"), ("name", "number"))
    kept["container"] = _part(rec.get("container"), ("runtime", "id", "name", "image", "pod_namespace", "pod_name",
                                                     "confidence"))
    kept["core"] = _part(rec.get("core"), ("stored", "reason", "complete", "truncated", "size", "compressed_size"))
    kept["collector"] = _part(rec.get("collector"), ("duration",))
    kept["signature"] = _part(rec.get("signature"), ("hash", "text", "source", "site"))
    return kept


#: A config, or what returns the current one (a long-running server follows changes to the file).
Configured = Union[Config, Callable[[], Config]]


class StoreCollector(Collector):
    """The metrics of the store at ``cfg.store``. Called from one thread (the endpoint's event loop, ``listen``),
    so one computation at a time; a result is reused for ``FRESH`` seconds, or ``STALE`` while the store's
    generation (its ledger, state file, the shipper's status) and the config are unchanged. A computation reads only the
    records that changed since the last one (catalog.RecordCache), and keeps only what the metrics need of
    each (``slim``)."""

    def __init__(self, cfg: Configured):
        self.current = cfg if callable(cfg) else lambda: cfg
        self._cache = catalog.RecordCache(slim)
        self._result: list = []
        self._key: object = None
        self._when = 0.0

    def collect(self) -> Iterator[Metric]:
        cfg = self.current()
        key = (catalog.generation(cfg.store), repr(cfg))
        age = time.monotonic() - self._when
        if not self._result or not (age < FRESH or (age < STALE and key == self._key)):
            self._result, self._key, self._when = list(self._compute(cfg)), key, time.monotonic()
        return iter(self._result)

    def _compute(self, cfg: Config) -> Iterator[Metric]:
        problems: list = []
        items = sorted(self._cache.items(cfg.store, problems), key=catalog.sort_key)
        records = [rec for _path, rec in items]
        yield self._crashes(records)
        yield from self._signatures(items, cfg.metrics_max_signatures)
        yield from self._cores(records)
        yield self._durations(records)
        yield from self._store(cfg, len(problems))
        yield _dropped(cfg.store)
        if cfg.ship_to:
            yield from self._ship(cfg.store, items)

    def _crashes(self, records: list) -> Metric:
        family = CounterMetricFamily("corepipe_crashes", "Crashes recorded in the store", labels=CRASH_LABELS)
        counts: dict = {}
        for rec in records:
            sig = rec.get("signal") or {}
            labels = (*_container_labels(rec.get("container") or {}),
                      label(sig.get("name") or sig.get("number") or "unknown"))
            counts[labels] = counts.get(labels, 0) + 1
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        return family

    def _signatures(self, items: list, cap: int) -> Iterator[Metric]:
        """Crashes per signature: ``metrics_max_signatures`` of them by hash, those first seen in the last
        ``NEW_SIGNATURE`` seconds first (so a new signature reaches the "new signature" alert however many old
        ones crash more), then the most crashes; the rest summed as ``other`` (a crash loop of new signatures
        cannot explode the label set). Their text in ``corepipe_signature_info`` (free text is no counter's
        label), and when each was first seen."""
        crashes = CounterMetricFamily("corepipe_signature_crashes", "Crashes per signature (see corepipe list --group)",
                                      labels=["signature"])
        info = GaugeMetricFamily("corepipe_signature_info", "A signature's text (title); always 1",
                                 labels=["signature", "title"])
        first = GaugeMetricFamily("corepipe_signature_first_seen_timestamp_seconds",
                                  "Dump time of the oldest crash in the store with this signature",
                                  labels=["signature"])
        groups = signature.groups(items)
        since = time.time() - NEW_SIGNATURE
        new = [g["hash"] for g in groups
               if isinstance(g["first_timestamp"], (int, float)) and g["first_timestamp"] >= since][:cap]
        chosen = set(new) | set([g["hash"] for g in groups if g["hash"] not in new][:cap - len(new)])
        shown = [g for g in groups if g["hash"] in chosen]
        for group in shown:
            crashes.add_metric([label(group["hash"])], group["count"])
            info.add_metric([label(group["hash"]), label(group["signature"], MAX_TITLE)], 1)
            if isinstance(group["first_timestamp"], (int, float)):
                first.add_metric([label(group["hash"])], group["first_timestamp"])
        if len(groups) > len(shown):
            crashes.add_metric([OTHER], sum(g["count"] for g in groups if g["hash"] not in chosen))
        yield crashes
        yield info
        yield first
        yield GaugeMetricFamily("corepipe_signatures", "Distinct signatures in the store", value=len(groups))

    def _cores(self, records: list) -> Iterator[Metric]:
        cores = CounterMetricFamily("corepipe_cores", "Cores by what happened to them (outcome) and why (reason)",
                                    labels=["outcome", "reason"])
        counts: dict = {}
        stored = compressed = present = 0
        for rec in records:
            what = outcome(rec)
            counts[what] = counts.get(what, 0) + 1
            core = rec.get("core") or {}
            if what[0] == "stored":
                stored += core.get("size") or 0
                compressed += core.get("compressed_size") or 0
                if core.get("stored"):
                    present += core.get("compressed_size") or 0
        for labels, count in sorted(counts.items()):
            cores.add_metric(list(labels), count)
        yield cores
        yield CounterMetricFamily("corepipe_core_stored_bytes", "Compressed bytes of cores written to the store "
                                  "(including cores deleted since)", value=compressed)
        yield CounterMetricFamily("corepipe_core_uncompressed_bytes", "Uncompressed bytes of the cores written",
                                  value=stored)
        yield GaugeMetricFamily("corepipe_store_core_bytes", "Compressed bytes of the cores the store holds now",
                                value=present)

    def _durations(self, records: list) -> Metric:
        durations = sorted(d for d in ((rec.get("collector") or {}).get("duration") for rec in records)
                           if isinstance(d, (int, float)))
        buckets, index = [], 0
        for bound in DURATION_BUCKETS:
            while index < len(durations) and durations[index] <= bound:
                index += 1
            buckets.append((repr(bound), index))
        buckets.append(("+Inf", len(durations)))
        return HistogramMetricFamily("corepipe_handler_duration_seconds",
                                     "Time the handler took per crash (record's collector.duration)",
                                     buckets=buckets, sum_value=sum(durations))

    def _store(self, cfg: Config, unreadable: int) -> Iterator[Metric]:
        yield GaugeMetricFamily("corepipe_records_unreadable", "Crash directories whose record cannot be read",
                                value=unreadable)
        if not os.path.isdir(cfg.store):
            return
        size, free = fs.space(cfg.store)
        yield GaugeMetricFamily("corepipe_store_used_bytes", "Bytes allocated under the store (cores, records, "
                                "saved binaries)", value=fs.disk_use(cfg.store))
        yield GaugeMetricFamily("corepipe_store_free_bytes", "Bytes available on the store's filesystem",
                                value=free)
        yield GaugeMetricFamily("corepipe_store_size_bytes", "Size of the store's filesystem", value=size)
        # The storage policy's effective limits (0: none), for the "store near full" alerts.
        yield GaugeMetricFamily("corepipe_store_max_use_bytes", "The store's max_use in bytes (0: no limit)",
                                value=policy.automatic(cfg.max_use, size, policy.AUTO_MAX_USE))
        yield GaugeMetricFamily("corepipe_store_keep_free_bytes", "The store's keep_free in bytes (0: none)",
                                value=policy.automatic(cfg.keep_free, size, policy.AUTO_KEEP_FREE))

    def _ship(self, store: str, items: list) -> Iterator[Metric]:
        """The shipping backlog (finished crashes without shipped.json) and the shipper's last sweep, from
        its ship-status.json: a node whose backlog grows, or whose last error is recent, is not shipping."""
        backlog = [rec for path, rec in items if catalog.unshipped(path, rec)]
        yield GaugeMetricFamily("corepipe_ship_backlog_crashes", "Finished crashes not shipped yet",
                                value=len(backlog))
        yield GaugeMetricFamily("corepipe_ship_backlog_bytes", "Compressed bytes of the cores of the crashes not "
                                "shipped yet", value=sum((rec.get("core") or {}).get("compressed_size") or 0
                                                          for rec in backlog if (rec.get("core") or {}).get("stored")))
        last = catalog.last_sweep(store) or {}
        for name, when, help_text in (
                ("corepipe_ship_last_sweep_timestamp_seconds", last.get("time"), "When the shipper's last sweep ended"),
                ("corepipe_ship_last_error_timestamp_seconds", (last.get("last_error") or {}).get("time"),
                 "When the shipper last failed to ship a crash")):
            if isinstance(when, (int, float)):
                yield GaugeMetricFamily(name, help_text, value=when)
        if last:
            yield GaugeMetricFamily("corepipe_ship_last_sweep_ok", "1 if the shipper's last sweep shipped "
                                    "everything it tried, else 0", value=1 if last.get("ok") else 0)


def _dropped(store: str) -> Metric:
    """Crashes counted instead of recorded (over ``records_max_use``) per policy group, from the books' state
    file: the ``MAX_DROPPED_GROUPS`` groups that dropped most, the rest summed as ``other`` (a flood from many
    uids cannot explode the label set)."""
    family = CounterMetricFamily("corepipe_records_dropped", "Crashes counted instead of recorded (over the "
                                 "policy group's records_max_use, or below keep_free)", labels=["policy_group"])
    most = sorted(books.dropped_records(store).items(), key=lambda item: (-item[1], item[0]))
    for group, count in most[:MAX_DROPPED_GROUPS]:
        family.add_metric([label(group)], count)
    if len(most) > MAX_DROPPED_GROUPS:
        family.add_metric([OTHER], sum(count for _group, count in most[MAX_DROPPED_GROUPS:]))
    return family


class ServerCollector(Collector):
    """The resident collector's own counters, from ``health()`` (its serve.json, rewritten every 2 s by the
    accept loop; None when there is none): they start again at 0 when the server restarts."""

    def __init__(self, health: Callable[[], Optional[dict]]):
        self.health = health

    def collect(self) -> Iterator[Metric]:
        health = self.health()
        if not health:
            return
        stats = health.get("stats") or {}
        yield CounterMetricFamily("corepipe_serve_accepted", "Kernel connections the resident collector accepted",
                                  value=stats.get("accepted", 0))
        yield CounterMetricFamily("corepipe_serve_worker_failures", "Workers that ended abnormally",
                                  value=stats.get("worker_failures", 0))
        loads = CounterMetricFamily("corepipe_serve_dispatched", "Crashes handed to a worker, by the load then "
                                    "(normal, fast: compression level 1, record-only)", labels=["load"])
        for load, count in sorted((stats.get("degraded") or {}).items()):
            loads.add_metric([str(load)], count)
        yield loads
        workers = GaugeMetricFamily("corepipe_serve_workers", "Workers, busy (collecting) or idle", labels=["state"])
        workers.add_metric(["busy"], health.get("busy", 0))
        workers.add_metric(["idle"], health.get("idle", 0))
        yield workers
        yield GaugeMetricFamily("corepipe_serve_queued", "Crashes waiting for a worker", value=health.get("queued", 0))


def registry(cfg: Configured, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry of the store's metrics; ``extra`` collectors are added to it: the hook for metrics of other
    parts (the server's counters, a shipping backlog)."""
    result = CollectorRegistry(auto_describe=False)
    result.register(StoreCollector(cfg))
    for collector in extra:
        result.register(collector)
    return result


def render(cfg: Configured, extra: Iterable[Collector] = ()) -> tuple:
    """(exposition bytes, content type) of a fresh scrape: what a server answers to ``GET /metrics``."""
    return generate_latest(registry(cfg, extra)), CONTENT_TYPE_LATEST


def write_textfile(directory: str, cfg: Config) -> str:
    """Write ``DIRECTORY/corepipe.prom`` for node_exporter's textfile collector (a temporary file renamed
    over it, so a scrape never reads half a file); returns its path."""
    path = os.path.join(directory, TEXTFILE)
    write_to_textfile(path, registry(cfg))
    return path


def listen(host: str, port: int, cfg: Configured, extra: Iterable[Collector] = ()) -> tuple:
    """Serve the metrics over HTTP (every path, ``/metrics`` included) from a thread; (server, thread, the
    port bound: ``port`` 0 takes any free one).

    One event loop, no thread per connection: a connection must send its request within ``TIMEOUT`` seconds
    and take the answer within as many, or it is closed; past ``MAX_CONNECTIONS`` the oldest is closed. So
    idle or slow clients hold nothing for long, and a scrape is computed by one thread, one at a time."""
    answer = functools.partial(_answer, registry(cfg, extra), collections.OrderedDict())
    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(asyncio.start_server(answer, host, port, limit=MAX_REQUEST,
                                                              backlog=MAX_CONNECTIONS))
    except BaseException:
        loop.close()
        raise
    thread = threading.Thread(target=loop.run_forever, name="corepipe-metrics", daemon=True)
    thread.start()
    return server, thread, server.sockets[0].getsockname()[1]


async def _answer(metrics: CollectorRegistry, open_connections: collections.OrderedDict,
                  reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.0 exchange: the request's head (at most MAX_REQUEST bytes, within TIMEOUT), then the
    exposition (or 405 for anything but GET), then close."""
    open_connections[writer] = None
    while len(open_connections) > MAX_CONNECTIONS:
        oldest, _ = open_connections.popitem(last=False)
        oldest.transport.abort()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        method = head.split(b" ", 1)[0]
        status, body, content_type = "405 Method Not Allowed", b"only GET\n", "text/plain; charset=utf-8"
        if method == b"GET":
            try:
                status, body, content_type = "200 OK", generate_latest(metrics), CONTENT_TYPE_LATEST
            except Exception as exc:  # noqa: BLE001 - a scrape that fails says why; the endpoint stays
                status, body = "500 Internal Server Error", f"{type(exc).__name__}: {exc}\n".encode(errors="replace")
        writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await asyncio.wait_for(writer.drain(), TIMEOUT)
    except (OSError, EOFError, asyncio.TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
        pass  # a client that went, stalled or sent too much: nothing to answer
    finally:
        open_connections.pop(writer, None)
        writer.transport.abort()
