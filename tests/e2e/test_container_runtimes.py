"""Crashes inside real containers, through the real kernel: Docker, Podman, runc, containerd and LXC.

For each runtime: the crash is filed under the id the runtime itself reports, the record's
name and image are the runtime's, gdb finds ``main`` at the crashing line in the stored core,
and a container started without a core limit override gets what its limit says.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cgroups import remove_everywhere
from runtimes import PODMAN, PODMAN_ULIMITS, image, runc_bundle, unique
from support import CRASH_LINE, decompress, gdb_backtrace, need, need_tool, set_core_limit, short_tempdir

from corepipe import cli
from corepipe.domain import containers

UNLIMITED = 2**64 - 1


def _core_limit(run_image: list) -> int:
    """RLIMIT_CORE (soft, bytes) a container gets from ``run_image``, as its own /proc/self/limits says."""
    limits = subprocess.run([*run_image, "cat", "/proc/self/limits"], capture_output=True, text=True, check=True,
                            timeout=120).stdout
    soft = next(line for line in limits.splitlines() if line.startswith("Max core file size")).split()[4]
    return UNLIMITED if soft == "unlimited" else int(soft)


def _check_core(rec: dict, crasher: Path, tmp_path: Path) -> None:
    assert rec["status"] == "complete", rec["collector"]["errors"]
    assert rec["core"]["stored"] is True, rec["core"]
    decompress(Path(rec["_dir"]) / "core.zst", tmp_path / "core")
    bt = gdb_backtrace(str(crasher), tmp_path / "core")
    assert " main " in bt and f"crasher.c:{CRASH_LINE}" in bt, bt


def _check_filed(rec: dict, store: Path, runtime: str, cid: str) -> None:
    assert rec["container"]["runtime"] == runtime and rec["container"]["id"] == cid
    assert Path(rec["_dir"]).parent == store / runtime / containers.safe_name(cid)
    assert rec["container"]["confidence"] == "certain", rec["container"]
    assert rec["container"]["errors"] == []
    assert rec["process"]["trusted"] is True, rec["process"]["untrusted_reasons"]


# Docker ---------------------------------------------------------------------------------------

def _docker(args: list, name: str) -> tuple:
    """Run a container to its end; returns (exit code, id as `docker inspect` reports it)."""
    run = subprocess.run(["docker", "run", "--name", name, "--network=none", *args], capture_output=True,
                         text=True, timeout=120)
    cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                         check=True).stdout.strip()
    return run.returncode, cid


@pytest.fixture
def docker_name() -> str:
    name = unique("corepipe-3")
    yield name
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.mark.parametrize("command, pid1", [(["/crasher"], True), (["sh", "-c", "/crasher; true"], False)],
                         ids=["pid1", "child"])
def test_docker(kernel_handler, docker_image: str, docker_name: str, crasher: Path, tmp_path: Path,
                command: list, pid1: bool) -> None:
    code, cid = _docker(["--ulimit", "core=-1", docker_image, *command], docker_name)
    assert code == (139 if pid1 else 0)
    rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid and r["comm"] == "crasher")
    _check_filed(rec, kernel_handler.store, "docker", cid)
    assert (rec["ns_pid"] == 1) is pid1 and rec["pid"] != 1
    assert rec["container"]["name"] == docker_name and rec["container"]["image"] == docker_image
    assert rec["core_limit"] == UNLIMITED
    _check_core(rec, crasher, tmp_path)


def test_docker_default_core_limit(kernel_handler, docker_image: str, docker_name: str) -> None:
    """No --ulimit: the record follows the limit Docker gives containers (0 here: a record, no core)."""
    expected = _core_limit(["docker", "run", "--rm", "--network=none", docker_image])
    _code, cid = _docker([docker_image, "/crasher"], docker_name)
    rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid)
    _check_filed(rec, kernel_handler.store, "docker", cid)
    assert rec["core_limit"] == expected
    assert rec["core"]["stored"] is (expected != 0)
    if expected == 0:
        assert "RLIMIT_CORE" in rec["core"]["reason"] and not (Path(rec["_dir"]) / "core.zst").exists()


# Podman ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman_image(rootfs: Path) -> str:
    with image("podman", rootfs, "corepipe-3") as ref:
        yield ref


@pytest.fixture
def podman_name() -> str:
    name = unique("corepipe-3")
    yield name
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)


def _podman(args: list, name: str) -> dict:
    subprocess.run([*PODMAN, "run", "--name", name, "--network=none", *args], capture_output=True, timeout=120)
    inspect = subprocess.run(["podman", "inspect", name], capture_output=True, text=True, check=True).stdout
    return json.loads(inspect)[0]


@pytest.mark.parametrize("command, pid1", [(["/crasher"], True), (["sh", "-c", "/crasher; true"], False)],
                         ids=["pid1", "child"])
def test_podman(kernel_handler, podman_image: str, podman_name: str, crasher: Path, tmp_path: Path,
                command: list, pid1: bool) -> None:
    info = _podman([*PODMAN_ULIMITS, "--ulimit", "core=-1", podman_image, *command], podman_name)
    cid = info["Id"]
    rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid and r["comm"] == "crasher")
    _check_filed(rec, kernel_handler.store, "podman", cid)
    assert (rec["ns_pid"] == 1) is pid1
    assert rec["container"]["name"] == info["Name"] == podman_name
    assert rec["container"]["image"] == info["ImageName"] == podman_image
    _check_core(rec, crasher, tmp_path)


def test_podman_default_core_limit(kernel_handler, podman_image: str, podman_name: str) -> None:
    expected = _core_limit([*PODMAN, "run", "--rm", "--network=none", podman_image])
    cid = _podman([podman_image, "/crasher"], podman_name)["Id"]
    rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid)
    _check_filed(rec, kernel_handler.store, "podman", cid)
    assert rec["core_limit"] == expected and rec["core"]["stored"] is (expected != 0)


# runc -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [UNLIMITED, 0], ids=["core-unlimited", "core-0"])
def test_runc(kernel_handler, rootfs: Path, crasher: Path, tmp_path: Path, limit: int) -> None:
    bundle = runc_bundle(tmp_path, rootfs, ["/crasher"], core_limit=limit)
    cid = unique("corepipe-3")
    try:
        run = subprocess.run(["runc", "run", cid], cwd=bundle, capture_output=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 139, run.stderr.decode(errors="replace")[-300:]
        rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    _check_filed(rec, kernel_handler.store, "runc", cid)
    assert rec["container"]["name"] == cid and rec["container"]["image"] is None
    assert rec["container"]["details"]["bundle"] == str(bundle)
    assert rec["core_limit"] == limit
    if limit:
        _check_core(rec, crasher, tmp_path)
    else:
        assert rec["core"]["stored"] is False and "RLIMIT_CORE" in rec["core"]["reason"]


# containerd (its own daemon on its own socket, as Kubernetes' CRI plugin would label a container) -----

CRI_ANNOTATIONS = {
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.container-name": "app",
    "io.kubernetes.cri.sandbox-name": "web-7d4b9c-x2x5p",
    "io.kubernetes.cri.sandbox-namespace": "shop",
    "io.kubernetes.cri.sandbox-uid": "0f3e8a52-8c1b-4a51-9a43-2f7c7d1c9e11",
    "io.kubernetes.cri.image-name": "registry.example/shop/web:1.2",
}


@pytest.fixture(scope="module")
def ctr() -> list:
    """A containerd of our own (root, state and socket in a temporary directory), stopped afterwards."""
    need_tool("containerd")
    need_tool("ctr")
    base = short_tempdir()
    sock = base / "c.sock"
    (base / "config.toml").write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n')
    command = ["ctr", "--address", str(sock), "--namespace", "k8s.io"]
    daemon = None
    try:
        with open(base / "log", "wb") as log:
            daemon = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=log,
                                      stderr=log, preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        for _ in range(100):
            if subprocess.run([*command, "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"containerd did not start: {(base / 'log').read_text()[-500:]}")
        yield command
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def _ctr_crash(kernel_handler, ctr: list, rootfs: Path, cid: str, options: list = ()) -> dict:
    """Run /crasher as containerd task ``cid`` with the CRI annotations (and ``options``); its record."""
    annotations = [arg for key, value in CRI_ANNOTATIONS.items() for arg in ("--annotation", f"{key}={value}")]
    try:
        subprocess.run([*ctr, "run", "--rm", *annotations, *options, "--rootfs", str(rootfs), cid, "/crasher"],
                       capture_output=True, timeout=120)
        return kernel_handler.wait_record(lambda r: r["container"]["id"] == cid)
    finally:
        subprocess.run([*ctr, "task", "rm", "-f", cid], capture_output=True)
        subprocess.run([*ctr, "container", "rm", cid], capture_output=True)


def test_containerd_cri_annotations(kernel_handler, ctr: list, rootfs: Path, crasher: Path, tmp_path: Path) -> None:
    cid = unique("corepipe-3")
    rec = _ctr_crash(kernel_handler, ctr, rootfs, cid)
    _check_filed(rec, kernel_handler.store, "containerd", cid)
    container = rec["container"]
    assert container["cgroup"] == f"/k8s.io/{cid}"
    assert container["details"]["namespace"] == "k8s.io"
    assert (container["name"], container["image"]) == ("app", "registry.example/shop/web:1.2")
    assert (container["pod_name"], container["pod_namespace"], container["pod_uid"]) == (
        "web-7d4b9c-x2x5p", "shop", "0f3e8a52-8c1b-4a51-9a43-2f7c7d1c9e11")
    _check_core(rec, crasher, tmp_path)


def test_podman_conmon_crash_is_the_containers_monitor(kernel_handler, podman_image: str, podman_name: str,
                                                        fake_containers) -> None:
    """conmon in ``libpod-conmon-<id>.scope`` (the systemd driver's layout, made by hand: no systemd here) dies:
    filed with its container, marked as its monitor, because it is the conmon podman's run root records."""
    subprocess.run([*PODMAN, "run", "-d", "--name", podman_name, "--network=none", podman_image, "sleep", "600"],
                   check=True, capture_output=True, timeout=120, preexec_fn=set_core_limit(resource.RLIM_INFINITY))
    cid, conmon = subprocess.run(["podman", "inspect", "-f", "{{.Id}} {{.State.ConmonPid}}", podman_name],
                                 check=True, capture_output=True, text=True).stdout.split()
    scope = fake_containers.parent / "machine.slice" / f"libpod-conmon-{cid}.scope"
    scope.mkdir(parents=True)
    fake_containers.made.append(scope)
    (scope / "cgroup.procs").write_text(conmon)
    os.kill(int(conmon), signal.SIGSEGV)
    rec = kernel_handler.wait_record(lambda r: r["pid"] == int(conmon))
    _check_filed(rec, kernel_handler.store, "podman", cid)
    assert rec["container"]["details"]["monitor"] == "conmon" and rec["container"]["name"] == podman_name
    assert rec["comm"] == "conmon"


POD_SLICE = f"kubepods-besteffort-pod{CRI_ANNOTATIONS['io.kubernetes.cri.sandbox-uid'].replace('-', '_')}.slice"


@pytest.mark.parametrize("parent, slice_name", [
    ("", POD_SLICE), ("system.slice/containerd.service", POD_SLICE), ("", "batch-corepipe.slice"),
], ids=["kubepods", "below-containerd-service", "not-kubepods"])
def test_containerd_kubelet_systemd_cgroup(kernel_handler, ctr: list, rootfs: Path, crasher: Path, tmp_path: Path,
                                           parent: str, slice_name: str) -> None:
    """The kubelet's systemd-driver cgroupsPath ``<slice>:cri-containerd:<id>`` given to a cgroupfs runc, which
    takes it as a directory name, under any parent (containerd's own unit, a slice that is not kubepods): the
    container from the path's last field, QoS from a pod slice, names from the CRI annotations."""
    cid = unique("corepipe-11")
    top = unique("/corepipe-11-parent")  # every parent below a root of this test's own, removed afterwards
    cgroup = "/".join(filter(None, (top, parent, f"{slice_name}:cri-containerd:{cid}")))
    try:
        rec = _ctr_crash(kernel_handler, ctr, rootfs, cid, ["--cgroup", cgroup])
    finally:
        remove_everywhere(top)
    _check_filed(rec, kernel_handler.store, "containerd", cid)
    container = rec["container"]
    assert container["cgroup"] == cgroup and container["details"]["cgroup_parent"] == slice_name
    assert container["details"].get("qos") == ("besteffort" if slice_name == POD_SLICE else None)
    pod_uid = CRI_ANNOTATIONS["io.kubernetes.cri.sandbox-uid"]
    assert (container["name"], container["pod_name"], container["pod_uid"]) == ("app", "web-7d4b9c-x2x5p", pod_uid)
    _check_core(rec, crasher, tmp_path)


def test_containerd_custom_cgroup_parent(kernel_handler, ctr: list, rootfs: Path) -> None:
    """A 64-hex container under a parent of the client's choosing (``nerdctl --cgroup-parent``, Nomad): no runtime's
    layout, so the id is looked up in each runtime's state, and containerd's confirms it."""
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    top = unique("/corepipe-11-parent")
    try:
        rec = _ctr_crash(kernel_handler, ctr, rootfs, cid, ["--cgroup", f"{top}/nomad/{cid}"])
    finally:
        remove_everywhere(top)
    _check_filed(rec, kernel_handler.store, "containerd", cid)
    assert rec["container"]["cgroup"] == f"{top}/nomad/{cid}" and rec["container"]["name"] == "app"


# Cloud Foundry Garden (Guardian runs each container with runc, named by its handle) ------------

@pytest.mark.parametrize("mode, parent", [("runc", "garden"), ("containerd", "system.slice/garden.service/garden")])
def test_garden(kernel_handler, ctr: list, rootfs: Path, tmp_path: Path, mode: str, parent: str) -> None:
    """A container in ``garden/<handle>`` (as Guardian puts it, also below garden.service), run as Guardian runs
    it: by runc itself (runc mode) or by containerd in its ``garden`` namespace; runc's state confirms it."""
    handle = unique("corepipe-11-garden")
    top = unique("/corepipe-11-parent")
    cgroup = f"{top}/{parent}/{handle}"
    try:
        if mode == "runc":
            bundle = runc_bundle(tmp_path, rootfs, ["/crasher", "0", "garden"])
            config = json.loads((bundle / "config.json").read_text())
            config["linux"]["cgroupsPath"] = cgroup
            (bundle / "config.json").write_text(json.dumps(config))
            try:
                subprocess.run(["runc", "run", handle], cwd=bundle, capture_output=True, timeout=120,
                               stdin=subprocess.DEVNULL)
                rec = kernel_handler.wait_record(lambda r: r["comm"] == "garden")
            finally:
                subprocess.run(["runc", "delete", "-f", handle], capture_output=True)
        else:
            garden = [arg if arg != "k8s.io" else "garden" for arg in ctr]
            rec = _ctr_crash(kernel_handler, garden, rootfs, handle, ["--cgroup", cgroup])
    finally:
        remove_everywhere(top)
    _check_filed(rec, kernel_handler.store, "garden", handle)
    container = rec["container"]
    assert container["cgroup"] == cgroup and container["name"] == handle
    assert container["source"] == "cgroup+state+pidns" and container["details"]["init_pid"] > 0


# LXC (lxc-start on a busybox rootfs, no network) --------------------------------------------------

LXC_PATH = Path("/var/lib/lxc")


@pytest.fixture
def lxc_container(rootfs: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """An LXC container under the system lxcpath (its name as long as the test's parameter asks), destroyed
    afterwards; yields its name."""
    need(os.geteuid() == 0, "needs root to start a system LXC container")
    need_tool("lxc-start")
    name = unique("corepipe-11-lxc") + "x" * getattr(request, "param", 0)
    directory = LXC_PATH / name
    shutil.copytree(rootfs, directory / "rootfs", symlinks=True)
    (directory / "config").write_text(
        f"lxc.uts.name = lxc11\nlxc.rootfs.path = dir:{directory}/rootfs\nlxc.net.0.type = empty\n"
        "lxc.init.cmd = /bin/sleep 600\nlxc.mount.auto = proc:mixed sys:ro\nlxc.autodev = 1\n"
        "lxc.apparmor.profile = unconfined\nlxc.prlimit.core = unlimited\n")
    try:
        yield name
    finally:
        subprocess.run(["lxc-stop", "-k", "-n", name], capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("lxc_container", [0, 80], ids=["name", "hashed-socket-name"], indirect=True)
def test_lxc_confirmed_by_its_monitor(kernel_handler, lxc_container: str, crasher: Path, tmp_path: Path) -> None:
    """A process attached to a running LXC container crashes: filed under the container, confirmed because its
    monitor (the command socket, hashed for a long name) gives the init PID, whose namespaces it shares."""
    name = lxc_container
    started = subprocess.run(["lxc-start", "-n", name], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    init = int(subprocess.run(["lxc-info", "-n", name, "-pH"], capture_output=True, text=True, check=True,
                              timeout=60).stdout)
    subprocess.run(["lxc-attach", "-n", name, "--", "/crasher", "0", "lxc-crash"], capture_output=True, timeout=120)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "lxc-crash")
    _check_filed(rec, kernel_handler.store, "lxc", name)
    container = rec["container"]
    assert container["source"] == "cgroup+state+pidns" and container["details"]["init_pid"] == init
    # lxc-attach puts the process in the container's .lxc child cgroup; the container is the payload.
    assert (container["details"]["manager"], container["details"]["scope"]) == ("lxc", f"/lxc.payload.{name}")
    assert container["cgroup"] == f"/lxc.payload.{name}/.lxc"
    _check_core(rec, crasher, tmp_path)


def test_lxc_init_crash_and_a_stopped_container(kernel_handler, lxc_container: str) -> None:
    """The container's init itself crashes (its monitor still answers while the kernel holds it); a cgroup
    named after a container that is not running is not confirmed: the crashing uid's policy group."""
    name = lxc_container
    config = LXC_PATH / name / "config"
    config.write_text(config.read_text().replace("/bin/sleep 600", "/crasher 0 lxc-init"))
    run = subprocess.run(["lxc-start", "-F", "-n", name], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "lxc-init")
    _check_filed(rec, kernel_handler.store, "lxc", name)
    assert rec["ns_pid"] == 1, run.stderr[-300:]
    found = containers.identify(f"0::/lxc.payload.{name}\n")
    found = containers.enrich(found, pid=os.getpid(), process=_live(os.getpid()))
    assert found.runtime == "lxc" and found.confidence == "likely", found
    assert "not running" in found.errors[0] and found.policy_group(1000) == ("uid", "1000")


def test_podman_name_from_conmon(podman_image: str, podman_name: str, tmp_path: Path) -> None:
    """Without containers/storage's lists, the name comes from conmon's command line, found above the process."""
    subprocess.run([*PODMAN, "run", "-d", "--name", podman_name, "--network=none", podman_image,
                    "sh", "-c", "sleep 60 & wait"], check=True, capture_output=True, timeout=120)
    pid1 = int(subprocess.run(["podman", "inspect", "-f", "{{.State.Pid}}", podman_name], check=True,
                              capture_output=True, text=True).stdout)
    child = None
    for _ in range(100):
        child = Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()
        if child:
            break
        time.sleep(0.05)
    root = tmp_path / "root"
    root.mkdir()
    # The real processes and conmon's pid files in the run root, but none of containers/storage's lists.
    (root / "proc").symlink_to("/proc")
    (root / "run").symlink_to("/run")
    for pid in (pid1, int(child[0])):
        found = containers.identify(Path(f"/proc/{pid}/cgroup").read_text(), root=str(root))
        found = containers.enrich(found, root=str(root), pid=pid, process=_live(pid))
        assert (found.runtime, found.name, found.details["name_from"]) == ("podman", podman_name, "conmon")
        assert found.confidence == "certain" and "containers/storage" in found.errors[0]


def _live(pid: int) -> containers.Process:
    """A running process's namespaces, as the handler captures a crashed one's."""
    fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY)
    try:
        return containers.Process(pid=pid, pid_ns=containers.pid_namespaces(fd),
                                  mnt_ns=os.readlink(f"/proc/{pid}/ns/mnt"))
    finally:
        os.close(fd)


def test_runc_inherits_core_limit(kernel_handler, rootfs: Path, tmp_path: Path) -> None:
    """A bundle without RLIMIT_CORE: the container has the limit `runc run` had, and the record honours it."""
    bundle = runc_bundle(tmp_path, rootfs, ["/crasher", "4"])
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["rlimits"] = []
    (bundle / "config.json").write_text(json.dumps(config))
    cid = unique("corepipe-3")
    limit = 65536
    try:
        subprocess.run(["runc", "run", cid], cwd=bundle, capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                       preexec_fn=set_core_limit(limit))
        rec = kernel_handler.wait_record(lambda r: r["container"]["id"] == cid)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    _check_filed(rec, kernel_handler.store, "runc", cid)
    assert rec["core_limit"] == limit
    assert rec["core"]["stored"] is True and rec["core"]["truncated"] is True and rec["core"]["size"] == limit


# corepipe resolve on a live container --------------------------------------------------------

def test_resolve_live_docker_container(docker_image: str, capsys: pytest.CaptureFixture) -> None:
    need(os.geteuid() == 0, "needs root to read a container's /proc entries")
    name = unique("corepipe-3")
    subprocess.run(["docker", "run", "-d", "--name", name, "--network=none", docker_image, "sleep", "60"],
                   check=True, capture_output=True, timeout=120)
    try:
        inspect = subprocess.run(["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}}", name], check=True,
                                 capture_output=True, text=True).stdout.split()
        assert cli.main(["resolve", "--json", inspect[1]]) == 0
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    out = json.loads(capsys.readouterr().out)
    assert (out["runtime"], out["id"], out["name"], out["image"]) == ("docker", inspect[0], name, docker_image)
    assert out["confidence"] == "certain" and "mountinfo" in out["details"]["evidence"]
