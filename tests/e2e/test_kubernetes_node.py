"""install/kubernetes/node.sh as the DaemonSet runs it: a privileged container in the host PID namespace.

The image is built as install/kubernetes/Dockerfile lays it out (checkout at /corepipe, entry point
node.sh) but from a local busybox rootfs (sh, cp, rm, nsenter, sleep) instead of debian:12-slim,
since tests pull nothing. Paths are pointed at a temporary directory through the COREPIPE_*
variables node.sh passes on to install.sh.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Optional

from runtimes import docker_usable
from support import CORE_PATTERN, HERE, KernelSettings, check_restored, need, need_root_kernel, need_tool

from corepipe.services import selftest

REPO = HERE.parent
APPLETS = ("sh", "cp", "rm", "sleep", "cat")
#: What daemonset.yaml asks for is --privileged; this VM's capability bounding set lacks CAP_SYS_RESOURCE,
#: so runc cannot start a privileged container here: these are the privileges node.sh actually uses.
PRIVILEGES = ["--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE", "--security-opt", "seccomp=unconfined",
              "--security-opt", "apparmor=unconfined"]


def _source_only(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
    return None if "__pycache__" in info.name or ".egg-info" in info.name else info


def installer_image_tar() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name in ("bin", "proc", "sys", "dev", "etc", "host-src", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(selftest.BUSYBOX, "bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        # util-linux's nsenter (the Dockerfile's; busybox's cannot enter a cgroup namespace) and its libraries.
        nsenter = shutil.which("nsenter")
        libraries = re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", nsenter], capture_output=True, text=True).stdout)
        tar.add(nsenter, "usr/bin/nsenter")
        for path in libraries:
            tar.add(os.path.realpath(path), path.lstrip("/"))
        # What the Dockerfile COPYs.
        for path in ("pyproject.toml", "README.md", "src", "install"):
            tar.add(REPO / path, f"corepipe/{path}", filter=_source_only)
    return data.getvalue()


def test_daemonset_node_script_installs_on_the_host_and_uninstalls(handler_dir: Path) -> None:
    need_root_kernel()
    need(docker_usable(), "needs a usable docker")
    need(selftest.is_static(selftest.BUSYBOX), "needs busybox-static")
    docker = need_tool("docker")
    need_tool("nsenter")
    d = handler_dir
    (d / "src").mkdir()
    tag = f"corepipe-4-node:{os.urandom(4).hex()}"
    name = tag.replace(":", "-")
    manifest = (REPO / "install" / "kubernetes" / "daemonset.yaml").read_text()
    assert "hostPID: true" in manifest and "privileged: true" in manifest
    assert "path: /opt/corepipe-src" in manifest and "mountPath: /host-src" in manifest
    assert "command: [/bin/sh, /corepipe/install/kubernetes/node.sh, stop]" in manifest
    dockerfile = (REPO / "install" / "kubernetes" / "Dockerfile").read_text()
    assert re.search(r"pip install .*'/corepipe\[[\w,]*metrics", dockerfile), "serve's metrics endpoint needs the extra"
    assert "mountPath: /run/corepipe}" in manifest and "path: /run/corepipe, type: DirectoryOrCreate" in manifest
    env = {"COREPIPE_HOST_SRC": f"{d}/src", "COREPIPE_PREFIX": f"{d}/v", "COREPIPE_BIN": f"{d}/b",
           "COREPIPE_CONFIG": f"{d}/c.toml", "COREPIPE_STORE": f"{d}/s",
           "COREPIPE_INSTALL_ARGS": f"--sysctl-dir {d}/sd", "COREPIPE_MODE": "pipe",
           # install.sh's other files: the node's own are left alone.
           "COREPIPE_UNITS_DIR": f"{d}/units", "COREPIPE_COMPLETION_DIR": f"{d}/bc", "COREPIPE_MAN_DIR": f"{d}/man"}
    # The node's namespaces are entered through a host process of ours: this VM's PID 1 belongs to the
    # sandbox and refuses nsenter; on a node it is init (node.sh's default COREPIPE_NODE_PID=1).
    host = subprocess.Popen(["sleep", "900"])
    env["COREPIPE_NODE_PID"] = str(host.pid)
    with KernelSettings() as settings:
        try:
            subprocess.run([docker, "import", "-", tag], input=installer_image_tar(), check=True, capture_output=True)
            run = [docker, "run", "-d", "--name", name, *PRIVILEGES, "--pid=host", "--network=none",
                   "-v", f"{d}/src:/host-src"]
            for key, value in env.items():
                run += ["-e", f"{key}={value}"]
            subprocess.run([*run, tag, "/bin/sh", "/corepipe/install/kubernetes/node.sh"], check=True,
                           capture_output=True)
            deadline = time.monotonic() + 600
            logs = ""
            while "corepipe installed on the node" not in logs:
                out = subprocess.run([docker, "logs", name], capture_output=True, text=True)
                logs = out.stdout + out.stderr
                state = subprocess.run([docker, "inspect", "-f", "{{.State.Running}}", name],
                                       capture_output=True, text=True).stdout.strip()
                assert state == "true" and time.monotonic() < deadline, logs
                time.sleep(0.5)
            assert "selftest passed" in logs, logs
            # node.sh runs in the pod's cgroup: the selftest expects its own crash filed under that container.
            assert "SIGSEGV in docker" in logs and "(selftest's own)" in logs, logs
            assert CORE_PATTERN.read_text().startswith((f"|{d}/b collect ", f"|{d}/corepipe-forward collect "))
            assert (d / "src" / "checkout" / "install" / "install.sh").exists()
            # The preStop hook: node.sh stop (the container's COREPIPE_BIN and COREPIPE_CONFIG are this test's).
            prestop = subprocess.run([docker, "exec", name, "/bin/sh", "/corepipe/install/kubernetes/node.sh", "stop"],
                                     capture_output=True, text=True, timeout=120)
            assert prestop.returncode == 0, prestop.stderr
            subprocess.run([docker, "stop", "-t", "30", name], check=True, capture_output=True)
            code = subprocess.run([docker, "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True,
                                  text=True).stdout.strip()
            assert code == "0"
            check_restored(settings, d)  # node.sh stop runs corepipe uninstall: install.sh's units stay in d/units
        finally:
            subprocess.run([docker, "rm", "-f", name], capture_output=True)
            subprocess.run([docker, "rmi", "-f", tag], capture_output=True)
            host.kill()
            host.wait()
