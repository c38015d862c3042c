"""``corepipe resolve``: a saved cgroup file, stdin, a live host process, errors (a live container: e2e)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corepipe import cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cgroup"


def test_cgroup_file_json(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["resolve", "--json", "--cgroup-file", str(FIXTURES / "k8s-systemd-burstable-crio-v1.txt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime"] == "cri-o" and out["pod_uid"] == "90d81341-92de-11e7-8cf2-507b9d4141fa"
    assert set(out) >= {"runtime", "id", "name", "image", "pod_name", "pod_namespace", "pod_uid", "source",
                        "confidence", "details", "errors"}


def test_cgroup_file_text_from_stdin() -> None:
    text = (FIXTURES / "lxc-payload-v2.txt").read_text()
    proc = subprocess.run([sys.executable, "-m", "corepipe", "resolve", "--cgroup-file", "-"], input=text,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "runtime:       lxc" in proc.stdout and "id:            web1" in proc.stdout


def test_missing_file_is_one_line(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["resolve", "--cgroup-file", "/nonexistent/cgroup"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("corepipe resolve: error: cannot read /nonexistent/cgroup")


def test_this_process_is_host(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["resolve", "--json", str(os.getpid())]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "host"


def test_no_such_process(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["resolve", "999999999"]) == 1
    assert "no process 999999999" in capsys.readouterr().err
