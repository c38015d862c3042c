"""Real container runtimes for the tests: a tiny rootfs, a Docker/Podman image of it, a runc bundle.

No registry is reachable: images are imported from a tar of a rootfs made of busybox-static
and the statically linked crasher. Everything created here carries a unique name and is
removed by its creator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from support import need

BUSYBOX = "/bin/busybox"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
#: The sandbox refuses to raise hard limits: give these beside any other --ulimit.
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run_crasher(tool: str, name: str, ref: str) -> str:
    """Run the image's /crasher in a new container ``name`` of ``tool`` (docker or podman, core unlimited) to its
    crash; the container's id. The caller removes the container."""
    argv = ["docker"] if tool == "docker" else [*PODMAN]
    ulimits = ["--ulimit", "core=-1"] if tool == "docker" else [*PODMAN_ULIMITS, "--ulimit", "core=-1"]
    subprocess.run([*argv, "run", "--name", name, "--network=none", *ulimits, ref, "/crasher"], capture_output=True,
                   timeout=120)
    return subprocess.run([tool, "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                          check=True).stdout.strip()


def make_rootfs(directory: Path, crasher: Path) -> Path:
    """/bin/busybox (+ sh) and /crasher: enough to run and crash a program in a container."""
    need(os.path.exists(BUSYBOX), "needs busybox-static at /bin/busybox")
    root = directory / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "kill"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir()
    shutil.copy2(crasher, root / "crasher")
    return root


def _tar(root: Path) -> bytes:
    return subprocess.run(["tar", "-C", str(root), "-c", "."], check=True, capture_output=True).stdout


def docker_usable() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


def docker_import(root: Path, name: str) -> str:
    """Import ``root`` as image ``name``; returns the image reference."""
    need(docker_usable(), "needs a running dockerd (docker info failed)")
    subprocess.run(["docker", "import", "-", name], input=_tar(root), check=True, capture_output=True)
    return name


def podman_import(root: Path, name: str) -> str:
    need(shutil.which("podman") is not None, "needs podman")
    ref = f"localhost/{name}"
    subprocess.run(["podman", "import", "-", ref], input=_tar(root), check=True, capture_output=True)
    return ref


@contextlib.contextmanager
def image(tool: str, root: Path, prefix: str) -> Iterator[str]:
    """An image of ``root`` imported into ``tool`` ("docker" or "podman") under a unique name, removed after."""
    ref = (docker_import if tool == "docker" else podman_import)(root, unique(prefix) + ":1")
    try:
        yield ref
    finally:
        subprocess.run([tool, "rmi", "-f", ref], capture_output=True)


def runc_bundle(directory: Path, root: Path, args: list, core_limit: int = 2**64 - 1) -> Path:
    """An OCI bundle from ``runc spec`` with the rlimits the sandbox refuses dropped."""
    need(shutil.which("runc") is not None, "needs runc")
    bundle = directory / "bundle"
    bundle.mkdir()
    shutil.copytree(root, bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, capture_output=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "hard": core_limit, "soft": core_limit}]
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle
