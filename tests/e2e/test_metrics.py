"""Metrics of real crashes: the textfile parsed by prometheus-client's parser, and a real Prometheus server
(Debian's package, on loopback, its TSDB in a temporary directory) scraping ``corepipe metrics --listen`` and
the endpoint of the resident collector, ``corepipe serve``."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
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
    short_tempdir,
    wait_for,
)

from corepipe.platform.config import Config
from corepipe.services import metrics

HOST_SEGV = 3


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
    host = ("container", "host"), ("image", ""), ("runtime", "host")
    assert crashes[tuple(sorted(host + (("signal", "SIGSEGV"),)))] == HOST_SEGV + 1
    assert crashes[tuple(sorted(host + (("signal", "SIGABRT"),)))] == 1
    container = next(labels for labels in crashes if ("runtime", "docker") in labels)
    assert ("image", docker_image) in container and crashes[container] == 1

    segv = next(r for r in store["records"] if r["comm"] == "m-segv")["signature"]
    per_signature = {dict(labels)["signature"]: value for (name, labels), value in found.items()
                     if name == "corepipe_signature_crashes_total"}
    # The crash without a core has the crash site's signature, counted with the backtraced ones of that site.
    assert per_signature == {segv["hash"]: HOST_SEGV + 2, next(r for r in store["records"] if r["comm"] == "m-abrt")
                             ["signature"]["hash"]: 1}
    cores = {labels: value for (name, labels), value in found.items() if name == "corepipe_cores_total"}
    assert cores == {(("outcome", "stored"), ("reason", "whole")): HOST_SEGV + 2,
                     (("outcome", "rejected"), ("reason", "rlimit_core_zero")): 1}
    assert found[("corepipe_handler_duration_seconds_count", ())] == HOST_SEGV + 3
    stored = sum(r["core"]["compressed_size"] for r in store["records"] if r["core"]["stored"])
    assert found[("corepipe_core_stored_bytes_total", ())] == stored
    assert found[("corepipe_store_free_bytes", ())] > 0 and found[("corepipe_store_used_bytes", ())] >= stored


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
def _prometheus(tmp_path: Path, target: int) -> Iterator[int]:
    """Debian's Prometheus on loopback, scraping 127.0.0.1:``target`` every second as job ``corepipe``; yields
    the port of its query API. Stopped (by PID) afterwards."""
    prometheus = shutil.which("prometheus")
    need(prometheus is not None, "needs Debian's prometheus package (tests/setup.sh installs it)")
    web = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: corepipe\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
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
        with served_handler(workdir, config_extra=NO_RATE_LIMIT) as served:
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
