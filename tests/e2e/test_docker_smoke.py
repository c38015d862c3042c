"""The seed article's scenario through the real kernel: a Docker container's PID 1 crashes with --ulimit core=-1."""

from __future__ import annotations

import subprocess
from pathlib import Path

from runtimes import unique


def test_docker_pid1_crash_is_filed_per_container(kernel_handler, docker_image: str) -> None:
    name = unique("corepipe-smoke")
    run = subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1",
                          docker_image, "/crasher"], capture_output=True, text=True, timeout=120)
    try:
        assert run.returncode == 139, run.stderr
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                             check=True).stdout.strip()
        rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid)
        assert rec["ns_pid"] == 1 and rec["pid"] != 1
        assert rec["container"]["runtime"] == "docker"
        assert rec["container"]["name"] == name and rec["container"]["image"] == docker_image
        assert Path(rec["_dir"]).parent == kernel_handler.store / "docker" / cid
        assert rec["core"]["stored"] is True
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
