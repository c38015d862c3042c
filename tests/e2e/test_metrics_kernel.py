"""Metrics of real crashes: the textfile parsed by prometheus-client's parser, and a real Prometheus server
(Debian's package, on loopback, its TSDB in a temporary directory) scraping ``corepipe metrics --listen`` and
the endpoint of the resident collector, ``corepipe serve``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtimes import unique
from support import (
    NO_RATE_LIMIT,
    corepipe_cli,
    crash,
    dmesg_lines,
    installed_handler,
    kernel_log_now,
    kernel_log_time,
    need,
    need_tool,
    served_handler,
    set_core_limit,
    short_tempdir,
    wait_for,
)

from corepipe.platform.config import Config
from corepipe.services import metrics

HOST_SEGV = 3
MONITORING = Path(__file__).resolve().parents[2] / "install" / "monitoring"
RULES = MONITORING / "corepipe-rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def store(crasher: Path, docker_image: str) -> dict:
    """Crashes: HOST_SEGV SIGSEGVs and one SIGABRT on the host, one SIGSEGV without a core (RLIMIT_CORE 0),
    one SIGSEGV in a container."""
    need_tool("gdb")
    workdir = short_tempdir()
    workdir.chmod(0o755)
    try:
        with installed_handler(workdir, config_extra=NO_RATE_LIMIT) as handler:
            for _ in range(HOST_SEGV):
                crash([str(crasher), "0", "m-segv"])
            crash([str(crasher), "0", "m-abrt", str(int(signal.SIGABRT))])
            crash([str(crasher), "0", "m-nocore"], core_limit=0)
            name = unique("corepipe-16m")
            try:
                subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1", docker_image,
                                "/crasher"], capture_output=True, timeout=120)
                cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                                     check=True).stdout.strip()
            finally:
                subprocess.run(["docker", "rm", "-f", name], capture_output=True)
            wait_for(lambda: len([r for r in handler.records() if r["status"] != "collecting"]) == HOST_SEGV + 3, 60,
                     "all records")
        yield {"handler": handler, "container": cid, "records": handler.records(), "dir": workdir}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found



def test_textfile_parses_and_counts_the_crashes(store: dict, tmp_path: Path, docker_image: str) -> None:
    proc = corepipe_cli(store["handler"].config, "metrics", "--textfile", str(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["corepipe.prom"]  # no temporary file left beside it
    found = _samples((tmp_path / "corepipe.prom").read_text())
    crashes = {labels: value for (name, labels), value in found.items() if name == "corepipe_crashes_total"}
    # No label a scrape target carries (Kubernetes' container, pod, namespace; job, instance).
    assert {key for labels in crashes for key, _value in labels} == set(metrics.CRASH_LABELS)
    assert not set(metrics.CRASH_LABELS) & {"job", "instance", "container", "pod", "namespace", "node", "image"}
    host = ("container_image", ""), ("container_name", "host"), ("pod_name", ""), ("pod_namespace", ""), \
        ("runtime", "host")
    assert crashes[tuple(sorted(host + (("signal", "SIGSEGV"),)))] == HOST_SEGV + 1
    assert crashes[tuple(sorted(host + (("signal", "SIGABRT"),)))] == 1
    container = dict(next(labels for labels in crashes if ("runtime", "docker") in labels))
    assert container["container_image"] == docker_image and container["container_name"] != "host"
    assert crashes[tuple(sorted(container.items()))] == 1

    segv = next(r for r in store["records"] if r["comm"] == "m-segv")["signature"]
    per_signature = {labels: value for (name, labels), value in found.items()
                     if name == "corepipe_signature_crashes_total"}
    abrt = next(r for r in store["records"] if r["comm"] == "m-abrt")["signature"]
    # The crash without a core has the crash site's signature, counted with the backtraced ones of that site.
    assert per_signature == {(("signature", segv["hash"]),): HOST_SEGV + 2, (("signature", abrt["hash"]),): 1}
    # The text is in an _info metric, not on the counter; with when each signature was first seen.
    info = {dict(labels)["signature"]: dict(labels)["title"] for (name, labels), value in found.items()
            if name == "corepipe_signature_info" and value == 1}
    assert info == {segv["hash"]: segv["text"][:metrics.MAX_TITLE], abrt["hash"]: abrt["text"][:metrics.MAX_TITLE]}
    first = {dict(labels)["signature"]: value for (name, labels), value in found.items()
             if name == "corepipe_signature_first_seen_timestamp_seconds"}
    assert first == {segv["hash"]: min(r["timestamp"] for r in store["records"] if r["comm"] in ("m-segv", "m-nocore")),
                     abrt["hash"]: next(r for r in store["records"] if r["comm"] == "m-abrt")["timestamp"]}
    cores = {labels: value for (name, labels), value in found.items() if name == "corepipe_cores_total"}
    assert cores == {(("outcome", "stored"), ("reason", "whole")): HOST_SEGV + 2,
                     (("outcome", "rejected"), ("reason", "rlimit_core_zero")): 1}
    assert found[("corepipe_handler_duration_seconds_count", ())] == HOST_SEGV + 3
    stored = sum(r["core"]["compressed_size"] for r in store["records"] if r["core"]["stored"])
    assert found[("corepipe_core_stored_bytes_total", ())] == stored
    assert found[("corepipe_store_free_bytes", ())] > 0 and found[("corepipe_store_used_bytes", ())] >= stored
    # The policy's effective limits (the handler's config leaves them automatic: a share of the filesystem).
    assert 0 < found[("corepipe_store_max_use_bytes", ())] < found[("corepipe_store_size_bytes", ())]
    assert 0 < found[("corepipe_store_keep_free_bytes", ())] < found[("corepipe_store_size_bytes", ())]
    assert found[("corepipe_signatures", ())] == 2
    assert found[("corepipe_core_uncompressed_bytes_total", ())] == sum(
        r["core"]["size"] for r in store["records"] if r["core"]["stored"])
    assert found[("corepipe_store_core_bytes", ())] == stored
    assert found[("corepipe_records_unreadable", ())] == 0


def test_an_unreadable_record_is_counted(store: dict, tmp_path: Path) -> None:
    """A crash directory whose record.json is not a record (cut short by a full disk, say) is counted, not
    fatal to the scrape; and the gauge goes back to 0 when it is gone."""
    crash_dir = Path(next(r["_dir"] for r in store["records"] if r["comm"] == "m-abrt"))
    bad = crash_dir.parent / (crash_dir.name[:-12] + "0badbadbad00")
    bad.mkdir(mode=0o700)
    try:
        (bad / "record.json").write_text('{"schema": 2, "id": ')
        proc = corepipe_cli(store["handler"].config, "metrics", check=False)
        assert proc.returncode == 0, proc.stderr
        assert _samples(proc.stdout)[("corepipe_records_unreadable", ())] == 1
    finally:
        shutil.rmtree(bad)
    assert _samples(corepipe_cli(store["handler"].config, "metrics").stdout)[("corepipe_records_unreadable", ())] == 0


def test_signature_labels_are_capped_with_an_other_bucket(store: dict) -> None:
    cfg = Config(store=str(store["handler"].store), metrics_max_signatures=1)
    body, content_type = metrics.render(cfg)
    assert content_type.startswith("text/plain")
    per_signature = {dict(labels)["signature"]: value for (name, labels), value in _samples(body.decode()).items()
                     if name == "corepipe_signature_crashes_total"}
    segv = next(r for r in store["records"] if r["comm"] == "m-segv")["signature"]
    assert per_signature == {segv["hash"]: HOST_SEGV + 2, "other": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except OSError:
        return []
    return answer["data"]["result"] if answer.get("status") == "success" else []


@contextlib.contextmanager
def _prometheus(tmp_path: Path, target: int, rules: bool = False) -> Iterator[int]:
    """Debian's Prometheus on loopback, scraping 127.0.0.1:``target`` every second as job ``corepipe`` (with
    ``rules``: the repository's alert rules, evaluated every second); yields the port of its query API.
    Stopped (by PID) afterwards."""
    prometheus = shutil.which("prometheus")
    need(prometheus is not None, "needs Debian's prometheus package (tests/setup.sh installs it)")
    web = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n  - {RULES}\n" if rules else "")
        + f"scrape_configs:\n  - job_name: corepipe\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
    scraper = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield web
    finally:
        _stop(scraper)


def test_prometheus_scrapes_the_endpoint(store: dict, tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(store["handler"].config),
                               "metrics", "--listen", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert "serving http://127.0.0.1:" in server.stderr.readline()
        with _prometheus(tmp_path, port) as web:
            result = wait_for(lambda: _query(web, 'sum by (runtime, signal) (corepipe_crashes_total{job="corepipe"})'),
                              120, "Prometheus to have scraped corepipe")
            counts = {(r["metric"]["runtime"], r["metric"]["signal"]): float(r["value"][1]) for r in result}
            assert counts == {("host", "SIGSEGV"): HOST_SEGV + 1, ("host", "SIGABRT"): 1, ("docker", "SIGSEGV"): 1}
            up = _query(web, 'up{job="corepipe"}')
            assert [float(r["value"][1]) for r in up] == [1.0]
            rejected = _query(web, 'corepipe_cores_total{outcome="rejected"}')
            assert [(r["metric"]["reason"], float(r["value"][1])) for r in rejected] == [("rlimit_core_zero", 1.0)]
    finally:
        _stop(server)


def test_prometheus_scrapes_the_resident_collector(crasher: Path, tmp_path: Path) -> None:
    """``corepipe serve`` serves the endpoint itself (metrics_listen; the test's servers take any free port on
    loopback): crashes through the kernel's socket, then Prometheus's query API has their counts."""
    workdir = short_tempdir()
    workdir.chmod(0o755)
    try:
        # ship_to (never shipped here): the shipping backlog's metrics, which the dashboard charts.
        with served_handler(workdir, config_extra=NO_RATE_LIMIT + 'ship_to = "s3://bucket/fleet"\n') as served:
            host, port = served.health()["metrics_address"].rsplit(":", 1)
            assert host == "127.0.0.1"
            for _ in range(2):
                crash([str(crasher), "0", "s-segv"])
            crash([str(crasher), "0", "s-abrt", str(int(signal.SIGABRT))])
            crash([str(crasher), "0", "s-nocore"], core_limit=0)
            wait_for(lambda: len([r for r in served.records() if r["status"] != "collecting"]) == 4, 60, "4 records")
            segv = next(r for r in served.records() if r["comm"] == "s-segv")["signature"]
            assert segv["source"] == "backtrace" and segv["text"].startswith("crasher SIGSEGV: ")
            # The server's counters reach the endpoint through its health file, rewritten every 2 s.
            wait_for(lambda: served.health()["stats"]["accepted"] == 4, 30, "the health file to count 4 crashes")
            with _prometheus(tmp_path, int(port)) as web:
                result = wait_for(lambda: _query(web, 'sum by (signal) (corepipe_crashes_total{job="corepipe"})'),
                                  120, "Prometheus to have scraped corepipe serve")
                assert {r["metric"]["signal"]: float(r["value"][1]) for r in result} == {"SIGSEGV": 3, "SIGABRT": 1}
                cores = _query(web, 'corepipe_cores_total{job="corepipe"}')
                assert {(r["metric"]["outcome"], r["metric"]["reason"]): float(r["value"][1]) for r in cores} == {
                    ("stored", "whole"): 3, ("rejected", "rlimit_core_zero"): 1}
                # Refused before the dump, the crash without a core has no notes, so no crash site to join by.
                nocore = next(r for r in served.records() if r["comm"] == "s-nocore")["signature"]
                assert nocore["source"] == "crash site" and nocore["text"].endswith(" SIGSEGV: at ?")
                signatures = _query(web, 'corepipe_signature_crashes_total{job="corepipe"}')
                per_signature = {r["metric"]["signature"]: float(r["value"][1]) for r in signatures}
                assert {k: v for k, v in per_signature.items() if k in (segv["hash"], nocore["hash"])} == {
                    segv["hash"]: 2, nocore["hash"]: 1}
                accepted = _query(web, 'corepipe_serve_accepted_total{job="corepipe"}')
                assert [float(r["value"][1]) for r in accepted] == [4.0]
                dispatched = _query(web, 'corepipe_serve_dispatched_total{job="corepipe"}')
                assert {r["metric"]["load"]: float(r["value"][1]) for r in dispatched if float(r["value"][1])} == {
                    "normal": 4.0}
                assert [float(r["value"][1]) for r in _query(web, 'corepipe_serve_queued{job="corepipe"}')] == [0.0]
                failures = _query(web, 'corepipe_serve_worker_failures_total{job="corepipe"}')
                assert [float(r["value"][1]) for r in failures] == [0.0]
                _check_dashboard_queries(web, f"http://{host}:{port}/metrics")
            metrics_pid = served.health()["metrics"]
            assert served.stop() == 0
            assert not Path(f"/proc/{metrics_pid}").exists(), "the metrics process ends with the server"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_resident_collector_collects_without_its_endpoint(crasher: Path) -> None:
    """A metrics port in use is one error line in the server's log; crashes are collected all the same."""
    workdir = short_tempdir()
    workdir.chmod(0o755)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            since = kernel_log_now()
            with served_handler(workdir, config_extra=f'metrics_listen = "{address}"\n') as served:
                assert served.health()["metrics"] is None
                [line] = [x for x in dmesg_lines(f"cannot listen on {address}") if kernel_log_time(x) > since]
                assert "error: serve: no metrics endpoint: " in line and "set metrics_listen to a free" in line
                crash([str(crasher), "0", "s-noport"])
                assert served.wait_record(lambda r: r["comm"] == "s-noport")["core"]["stored"] is True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_listen_refuses_a_bad_address_and_a_port_in_use(store: dict) -> None:
    proc = corepipe_cli(store["handler"].config, "metrics", "--listen", "127.0.0.1:notaport", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is not [HOST:]PORT" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = corepipe_cli(store["handler"].config, "metrics", "--listen", str(taken.getsockname()[1]), check=False)
    assert proc.returncode == 1 and "cannot listen on 127.0.0.1:" in proc.stderr and "pick another" in proc.stderr
    proc = corepipe_cli(store["handler"].config, "metrics", "--textfile", "/nonexistent/dir", check=False)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr


def _metric_names(expr: str) -> set:
    """The metric names a PromQL expression selects (not its functions, labels, or by/on lists)."""
    expr = re.sub(r'\{[^}]*\}|\[[^]]*\]|"[^"]*"|\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)',
                  " ", expr)
    return {name for name in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr)
            if name not in {"sum", "max", "min", "topk", "and", "or", "unless", "offset", "le"}
            and not re.fullmatch(r"\d+[smhd]?|e\d+", name)}


def _dashboard_exprs() -> list:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _check_dashboard_queries(web: int, endpoint: str) -> None:
    """Every metric the dashboard's queries use is in a real scrape of ``endpoint``, and every query, with
    Grafana's variables filled in, runs in the real Prometheus that scrapes it (and answers)."""
    with urllib.request.urlopen(endpoint, timeout=10) as response:
        scraped = {line.split("{")[0].split(" ")[0] for line in response.read().decode().splitlines()
                   if line and not line.startswith("#")}
    used = set().union(*(_metric_names(expr) for expr in _dashboard_exprs()))
    assert used - {"up"} <= scraped, f"not in a scrape: {sorted(used - {'up'} - scraped)}"
    assert {"corepipe_crashes_total", "corepipe_serve_workers", "corepipe_ship_backlog_crashes"} <= used
    fill = {"$instance": ".*", "$job": ".*", "$__rate_interval": "1m", "$__range": "5m"}
    for expr in _dashboard_exprs():
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.load(response)["status"] == "success", expr
        if "increase" not in expr and "rate(" not in expr:  # an instant query over gauges and counters answers
            assert _query(web, expr), f"no data: {expr}"


def test_dashboard_is_a_grafana_dashboard() -> None:
    """The dashboard's structure as Grafana imports it: a datasource input every query uses, unique panel ids
    and refIds, panels inside the 24-column grid without overlapping, every variable used defined."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "corepipe" and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    [source] = dashboard["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    uid = "${" + source["name"] + "}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set = set()
    for panel in dashboard["panels"]:
        assert panel["type"] in {"stat", "gauge", "timeseries", "table"} and panel["title"]
        assert panel["datasource"]["uid"] == uid
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"panel {panel['title']} overlaps another"
        cells |= mine
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, target["expr"]
            names = _metric_names(target["expr"])
            assert names and all(n == "up" or n.startswith("corepipe_") for n in names), names


def test_rules_load_in_promtool() -> None:
    """The rules load (promtool check rules) and their unit tests pass (promtool test rules): each alert on
    made-up series, firing and not (a prune's counter reset is no crash loop, old drops seen by a Prometheus
    just started are no records dropped); every alert of the rules has a unit test that expects it to fire."""
    promtool = need_tool("promtool")
    # The alert's window is the one in which the endpoint gives a new signature a series of its own.
    assert f"corepipe_signature_first_seen_timestamp_seconds < {metrics.NEW_SIGNATURE})" in RULES.read_text()
    alerts = re.findall(r"^ *- alert: (\w+)$", RULES.read_text(), re.M)
    # an expected alert: "exp_alerts:" and a list on the next lines (not "exp_alerts: []")
    fired = set(re.findall(r"alertname: (\w+)\n *exp_alerts:\n", (MONITORING / "corepipe-rules.test.yml").read_text()))
    assert "CorepipeRecordsDropped" in alerts and fired == set(alerts), set(alerts) ^ fired
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and f"SUCCESS: {len(alerts)} rules found" in check.stdout, \
        check.stdout + check.stderr
    tested = subprocess.run([promtool, "test", "rules", "corepipe-rules.test.yml"], cwd=MONITORING,
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def _alerts(web: int, name: str) -> list:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/alerts", timeout=5) as response:
            answer = json.load(response)
    except OSError:
        return []
    return [a for a in answer["data"]["alerts"] if a["labels"]["alertname"] == name]


def test_alerts_fire_on_real_crashes(crasher: Path, tmp_path: Path) -> None:
    """The repository's rules in a real Prometheus scraping ``corepipe metrics --listen``: a real crash through
    the kernel makes "new signature" fire for its signature; three more of the same host process make "crash
    looping" fire for the host."""
    workdir = short_tempdir()
    workdir.chmod(0o755)
    try:
        with installed_handler(workdir, config_extra=NO_RATE_LIMIT) as handler:
            crash([str(crasher), "0", "a-segv"])
            first = handler.wait_record(lambda r: r["comm"] == "a-segv" and r["status"] != "collecting")
            port = _free_port()
            server = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(handler.config),
                                       "metrics", "--listen", str(port)], stderr=subprocess.PIPE, text=True)
            try:
                assert "serving http://127.0.0.1:" in server.stderr.readline()
                with _prometheus(tmp_path, port, rules=True) as web:
                    [new] = wait_for(lambda: [a for a in _alerts(web, "CorepipeNewCrashSignature")
                                              if a["state"] in ("pending", "firing")], 120, "a new-signature alert")
                    assert new["labels"]["signature"] == first["signature"]["hash"]
                    assert new["labels"]["title"] == first["signature"]["text"][:metrics.MAX_TITLE]
                    assert not _alerts(web, "CorepipeContainerCrashLooping")
                    wait_for(lambda: _query(web, 'corepipe_crashes_total{runtime="host"}'), 60, "a scrape")
                    for _ in range(3):
                        crash([str(crasher), "0", "a-segv"])
                    wait_for(lambda: len([r for r in handler.records() if r["status"] != "collecting"]) == 4, 60,
                             "4 records")
                    [loop] = wait_for(lambda: [a for a in _alerts(web, "CorepipeContainerCrashLooping")
                                               if a["state"] in ("pending", "firing")], 120, "a crash-loop alert")
                    assert (loop["labels"]["runtime"], loop["labels"]["container_name"]) == ("host", "host")
                    assert float(loop["value"]) > 2
            finally:
                _stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- hostile input: issue 30 item 6 ------------------------------------------------------------------------------

FORGED = 3
RAW_NAME = b"crash\xff\xfe"  # an executable name that is not UTF-8


@pytest.fixture(scope="module")
def hostile(crasher: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Real crashes through the kernel: an executable whose file name and comm are not UTF-8, and FORGED
    crashes in plain cgroups that look like Docker containers (a forged id each, which no runtime confirms)."""
    from cgroups import FakeContainers

    workdir = short_tempdir()
    workdir.chmod(0o755)
    fakes = FakeContainers()
    try:
        raw = os.fsencode(workdir) + b"/" + RAW_NAME
        shutil.copy2(crasher, raw)
        with installed_handler(workdir, config_extra=NO_RATE_LIMIT) as handler:
            crash([raw, b"0", RAW_NAME])
            unlimited = set_core_limit(resource.RLIM_INFINITY)
            for _ in range(FORGED):
                join = fakes.join(fakes.new())
                subprocess.run([str(crasher), "0", "forged"], preexec_fn=lambda join=join: (unlimited(), join()),
                               capture_output=True, timeout=120)
            wait_for(lambda: len([r for r in handler.records() if r["status"] != "collecting"]) == FORGED + 1, 60,
                     "all records")
        yield {"handler": handler, "records": handler.records(), "dir": workdir}
    finally:
        fakes.remove()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _endpoint(config: Path) -> Iterator[tuple]:
    """``corepipe metrics --listen`` on a free loopback port: yields (its process, the port)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(config), "metrics", "--listen",
                               str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert "serving http://127.0.0.1:" in server.stderr.readline()
        yield server, port
    finally:
        _stop(server)


def _scrape(port: int, timeout: float = 30) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        assert response.status == 200
        return response.read().decode()


def test_hostile_names_and_forged_containers_scrape(hostile: dict) -> None:
    """A crash of an executable whose name is not UTF-8 is scraped over HTTP (it made every scrape fail: 500,
    UnicodeEncodeError), its name cleaned; forged container ids make no series of their own."""
    records = hostile["records"]
    raw = next(r for r in records if "forged" not in r["comm"])
    assert not raw["signature"]["text"].isprintable()  # the record keeps the undecodable bytes as such
    forged = [r for r in records if r["comm"] == "forged"]
    assert len(forged) == FORGED and all(r["container"]["runtime"] == "docker"
                                         and r["container"]["confidence"] != "certain" for r in forged)
    with _endpoint(hostile["handler"].config) as (_server, port):
        found = _samples(_scrape(port))
    titles = [dict(labels)["title"] for (name, labels) in found if name == "corepipe_signature_info"]
    assert any(t.startswith("crash??") for t in titles) and all(t.isprintable() for t in titles)
    crashes = {dict(labels)["container_name"]: value for (name, labels), value in found.items()
               if name == "corepipe_crashes_total" and dict(labels)["runtime"] == "docker"}
    assert crashes == {metrics.UNCONFIRMED: FORGED}


def _status(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def test_idle_connections_do_not_hold_the_endpoint(hostile: dict) -> None:
    """Idle and half-sent connections cost no thread, never keep a scrape out, and are closed after
    metrics.TIMEOUT (they each held a thread for ever: 3 to 134 threads in 20 s)."""
    with _endpoint(hostile["handler"].config) as (server, port):
        threads = _status(server.pid, "Threads")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2 * metrics.MAX_CONNECTIONS)]
        try:
            idle[-1].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
            started = time.monotonic()
            assert "corepipe_crashes_total" in _scrape(port, timeout=5)
            assert time.monotonic() - started < 5
            assert _status(server.pid, "Threads") <= threads + 1
            deadline = time.monotonic() + metrics.TIMEOUT + 10
            for conn in idle:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                assert conn.recv(1) == b"", "an idle connection was not closed"
        finally:
            for conn in idle:
                conn.close()


def test_scrapes_are_bounded_and_read_only_what_changed(hostile: dict, tmp_path: Path) -> None:
    """100 records of about 1 MiB each (what a record flood leaves): 4 concurrent scrapes stay within a bounded
    memory (they took 220 MiB), and a scrape after one more crash reads that crash's record, not the store."""
    store = tmp_path / "store"
    shutil.copytree(hostile["handler"].store, store, symlinks=True,
                    ignore=shutil.ignore_patterns("core*", ".build-id", ".*.tmp"))
    sample = next(store.glob("*/*/*/record.json"))
    rec = json.loads(sample.read_text())
    rec["cmdline"] = ["x" * 1000 + str(i) for i in range(900)]
    big = 100

    def plant(number: int) -> None:
        crash = f"{number:012x}"
        directory = sample.parent.parent / f"20261207T000000Z-{crash}"
        directory.mkdir()
        (directory / "record.json").write_text(json.dumps({**rec, "id": crash, "timestamp": 1796601600 + number}))
    for number in range(big):
        plant(number)
    config = tmp_path / "corepipe.toml"
    config.write_text(f'store = "{store}"\n')
    expected = len(hostile["records"]) + big
    records = sum(p.stat().st_size for p in store.glob("*/*/*/record.json"))
    with _endpoint(config) as (server, port):
        start = _io(server.pid)
        scrapes: list = []
        threads = [threading.Thread(target=lambda: scrapes.append(_scrape(port, timeout=120))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(scrapes) == 4
        for text in scrapes:
            assert sum(v for (name, _), v in _samples(text).items() if name == "corepipe_crashes_total") == expected
        assert _io(server.pid) - start < 1.5 * records  # one computation for the four scrapes
        peak = _status(server.pid, "VmHWM") << 10
        assert peak < 120 << 20, f"{peak >> 20} MiB"  # 401 MiB before
        plant(big)
        (store / ".ledger.json").touch()  # what the handler does when it finishes a crash: a new generation
        time.sleep(metrics.FRESH)
        before = _io(server.pid)
        text = _scrape(port)
        assert sum(v for (name, _), v in _samples(text).items() if name == "corepipe_crashes_total") == expected + 1
        assert _io(server.pid) - before < 4 << 20  # one record of 1 MiB and the small ones, not 100 MiB


def _io(pid: int) -> int:
    """Bytes the process has read (``rchar``)."""
    return int(next(x for x in Path(f"/proc/{pid}/io").read_text().splitlines() if x.startswith("rchar:")).split()[1])
