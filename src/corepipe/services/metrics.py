"""Prometheus metrics of a store, through the official ``prometheus-client`` (the optional extra ``metrics``).

Every figure is derived from the store's records when it is scraped, not counted in a process, so the
counters survive restarts and the collect path (one short process per crash) never loads this module:
``corepipe_crashes_total`` is the number of records, by runtime, container, image and signal. Removing
records (``prune``, ``rm``) lowers a counter, which Prometheus reads as a counter reset.

Entry points: ``render(cfg)`` (the exposition bytes and content type, for any server that wants to
answer ``/metrics`` itself, e.g. the resident collector), ``write_textfile(directory, cfg)`` (node_exporter's
textfile collector) and ``listen(host, port, cfg)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server, write_to_textfile
from prometheus_client.registry import Collector

from corepipe.domain import catalog, signature
from corepipe.platform import fs
from corepipe.platform.config import Config

TEXTFILE = "corepipe.prom"
OTHER = "other"
#: Seconds; collect's duration is mostly the core's size over the compression speed.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
MAX_TITLE = 120

#: core.reason -> (outcome, reason label); the first match wins. Reasons carry figures, labels must not.
_OUTCOMES = [
    (re.compile(r"rate limited: \d+ cores of this (container|executable|signature)"), "rate_limited", None),
    (re.compile(r"RLIMIT_CORE is 0"), "rejected", "rlimit_core_zero"),
    (re.compile(r"no room for the core"), "rejected", "no_room"),
    (re.compile(r"storage accounting failed"), "failed", "accounting"),
    (re.compile(r"write failed"), "failed", "write"),
    (re.compile(r"the kernel sent no core data"), "failed", "empty"),
]
_DELETED = re.compile(r"deleted: .*?(container_max_cores|container_max_bytes|max_use|keep_free)")


def outcome(rec: dict) -> tuple:
    """(outcome, reason) of a record's core, both from small fixed sets: stored (reason ``whole``,
    ``truncated``, ``partial`` or ``deleted_<limit>`` when deleted later), rate_limited (container,
    executable, signature), rejected, failed, collecting."""
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


def _container_label(container: dict) -> str:
    if container.get("runtime") == "host":
        return "host"
    return str(container.get("name") or (container.get("id") or "")[:12] or container.get("runtime") or "unknown")


class StoreCollector(Collector):
    """The metrics of the store at ``cfg.store``, read afresh at each scrape."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def collect(self) -> Iterator[Metric]:
        problems: list = []
        items = sorted(catalog.iter_records(self.cfg.store, problems), key=catalog.sort_key)
        records = [rec for _path, rec in items]
        yield self._crashes(records)
        yield from self._signatures(items)
        yield from self._cores(records)
        yield self._durations(records)
        yield from self._store(len(problems))

    def _crashes(self, records: list) -> Metric:
        family = CounterMetricFamily("corepipe_crashes", "Crashes recorded in the store",
                                     labels=["runtime", "container", "image", "signal"])
        counts: dict = {}
        for rec in records:
            container = rec.get("container") or {}
            sig = rec.get("signal") or {}
            labels = (str(container.get("runtime") or "unknown"), _container_label(container),
                      str(container.get("image") or ""), str(sig.get("name") or sig.get("number") or "unknown"))
            counts[labels] = counts.get(labels, 0) + 1
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        return family

    def _signatures(self, items: list) -> Iterator[Metric]:
        """Crashes per signature: the ``metrics_max_signatures`` with the most crashes by hash, the rest
        summed as ``other`` (a crash loop of new signatures cannot explode the label set)."""
        crashes = CounterMetricFamily("corepipe_signature_crashes", "Crashes per signature (see corepipe list --group)",
                                      labels=["signature", "title"])
        groups = signature.groups(items)
        cap = self.cfg.metrics_max_signatures
        for group in groups[:cap]:
            crashes.add_metric([group["hash"], group["signature"][:MAX_TITLE]], group["count"])
        if len(groups) > cap:
            crashes.add_metric([OTHER, OTHER], sum(g["count"] for g in groups[cap:]))
        yield crashes
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

    def _store(self, unreadable: int) -> Iterator[Metric]:
        yield GaugeMetricFamily("corepipe_records_unreadable", "Crash directories whose record cannot be read",
                                value=unreadable)
        if not os.path.isdir(self.cfg.store):
            return
        yield GaugeMetricFamily("corepipe_store_used_bytes", "Bytes allocated under the store (cores, records, "
                                "saved binaries)", value=fs.disk_use(self.cfg.store))
        yield GaugeMetricFamily("corepipe_store_free_bytes", "Bytes available on the store's filesystem",
                                value=fs.free_bytes(self.cfg.store))
        yield GaugeMetricFamily("corepipe_store_size_bytes", "Size of the store's filesystem",
                                value=fs.fs_size(self.cfg.store))


def registry(cfg: Config, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry of the store's metrics; ``extra`` collectors are added to it: the hook for metrics of other
    parts, such as a shipping backlog (records not yet shipped), which this module cannot count until the
    store marks shipped records."""
    result = CollectorRegistry(auto_describe=False)
    result.register(StoreCollector(cfg))
    for collector in extra:
        result.register(collector)
    return result


def render(cfg: Config, extra: Iterable[Collector] = ()) -> tuple:
    """(exposition bytes, content type) of a fresh scrape: what a server answers to ``GET /metrics``."""
    return generate_latest(registry(cfg, extra)), CONTENT_TYPE_LATEST


def write_textfile(directory: str, cfg: Config) -> str:
    """Write ``DIRECTORY/corepipe.prom`` for node_exporter's textfile collector (a temporary file renamed
    over it, so a scrape never reads half a file); returns its path."""
    path = os.path.join(directory, TEXTFILE)
    write_to_textfile(path, registry(cfg))
    return path


def listen(host: str, port: int, cfg: Config) -> tuple:
    """Serve the metrics over HTTP (every path, ``/metrics`` included) from a thread; (server, thread)."""
    return start_http_server(port, addr=host, registry=registry(cfg))


def parse_address(text: str) -> tuple:
    """(host, port) from ``[HOST:]PORT`` (IPv6 hosts in brackets); the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not [HOST:]PORT (a port is 1..65535)")
    return host, int(port)

