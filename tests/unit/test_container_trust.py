"""Issue 11: a container identity counts only when the runtime's state confirms it and the crashed process is
in the PID namespace of the container's init as that state records it; everything else gets the uid's policy
group. Replayed under a temporary root: the runtime's state files and /proc/<pid>/{cgroup,ns/pid,ns/mnt} of the
recorded init (the ns links are symlinks whose text is what the kernel's magic links read)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need

from corepipe.domain import containers
from corepipe.domain.containers import lxc

VICTIM = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
INNER = "ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a"
INIT = 4242
HOST_NS, CONTAINER_NS, INNER_NS = "pid:[4026531836]", "pid:[4026532001]", "pid:[4026532002]"
CONTAINER_MNT = "mnt:[4026532100]"


def _proc(root: Path, pid: int, cgroup: str, pid_ns: str, mnt_ns: str = CONTAINER_MNT) -> None:
    base = root / "proc" / str(pid)
    (base / "ns").mkdir(parents=True)
    (base / "cgroup").write_text(f"0::{cgroup}\n")
    (base / "ns" / "pid").symlink_to(pid_ns)
    (base / "ns" / "mnt").symlink_to(mnt_ns)


def _docker(root: Path, cid: str, pid: int, running: bool = True) -> None:
    directory = root / "var/lib/docker/containers" / cid
    directory.mkdir(parents=True)
    (directory / "config.v2.json").write_text(json.dumps({
        "Name": "/victim", "Config": {"Image": "shop/web:1"}, "State": {"Running": running, "Pid": pid}}))


def _resolve(root: Path, cgroup: str, pid_ns: list, mnt_ns: str = CONTAINER_MNT, pid: int = 999,
             mountinfo: str = "") -> containers.Container:
    found = containers.identify(f"0::{cgroup}\n", mountinfo=mountinfo, root=str(root))
    process = containers.Process(pid=pid, pid_ns=pid_ns, mnt_ns=mnt_ns)
    return containers.enrich(found, root=str(root), pid=pid, process=process) if not found.is_host else found


SCOPE = f"/system.slice/docker-{VICTIM}.scope"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A Docker container VICTIM whose init (INIT) is in its cgroup, in its own PID and mount namespaces."""
    _docker(tmp_path, VICTIM, INIT)
    _proc(tmp_path, INIT, SCOPE, CONTAINER_NS)
    return tmp_path


def test_state_and_pid_namespace_confirm(root: Path) -> None:
    found = _resolve(root, SCOPE, [CONTAINER_NS, HOST_NS])
    assert (found.runtime, found.id, found.name, found.confidence) == ("docker", VICTIM, "victim", "certain")
    assert found.source == "cgroup+state+pidns" and "unconfirmed" not in found.details
    assert found.policy_group(1000) == ("docker", VICTIM)


@pytest.mark.parametrize("pid_ns, mnt_ns, why", [
    ([HOST_NS], CONTAINER_MNT, "not in the PID namespace of the container's init"),
    ([INNER_NS, HOST_NS], CONTAINER_MNT, "not in the PID namespace of the container's init"),
    ([CONTAINER_NS, HOST_NS], "mnt:[4026531840]", "not in its mount namespace"),
    ([], CONTAINER_MNT, "namespaces are not known"),
], ids=["host-ns", "other-ns", "other-mnt", "no-process"])
def test_a_process_outside_the_containers_namespaces_is_not_the_container(root: Path, pid_ns: list, mnt_ns: str,
                                                                           why: str) -> None:
    """The cgroup and the state name the victim, but the process is not in its init's namespaces."""
    found = _resolve(root, SCOPE, pid_ns, mnt_ns)
    assert (found.runtime, found.id) == ("docker", VICTIM), "what was seen is recorded"
    assert found.confidence == "likely" and why in found.details["unconfirmed"]
    assert found.policy_group(1000) == ("uid", "1000")


def test_a_reused_init_pid_outside_the_containers_cgroup_confirms_nothing(root: Path, tmp_path: Path) -> None:
    """The recorded init PID now belongs to a process elsewhere (the container died, the PID was reused)."""
    (root / "proc" / str(INIT) / "cgroup").write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    found = _resolve(root, SCOPE, [CONTAINER_NS, HOST_NS])
    assert "is not in the container's cgroup" in found.details["unconfirmed"]
    assert found.policy_group(1000) == ("uid", "1000")


def test_a_stopped_container_confirms_nothing(tmp_path: Path) -> None:
    _docker(tmp_path, VICTIM, INIT, running=False)
    _proc(tmp_path, INIT, SCOPE, CONTAINER_NS)
    found = _resolve(tmp_path, SCOPE, [CONTAINER_NS, HOST_NS])
    assert "records no init process" in found.details["unconfirmed"]


def test_no_state_is_unconfirmed(tmp_path: Path) -> None:
    found = _resolve(tmp_path, SCOPE, [CONTAINER_NS, HOST_NS])
    assert "does not confirm" in found.details["unconfirmed"] and found.errors
    assert found.policy_group(7) == ("uid", "7")


def test_fake_scope_inside_a_container_files_the_crash_with_that_container(root: Path) -> None:
    """A container making docker-<other id>.scope below its own: the outer (real) container is the answer,
    the fake inner one is recorded, unconfirmed."""
    cgroup = f"{SCOPE}/docker-{INNER}.scope"
    found = _resolve(root, cgroup, [INNER_NS, CONTAINER_NS, HOST_NS])
    assert (found.id, found.confidence, found.details["nested_pid_ns"]) == (VICTIM, "certain", True)
    assert [(c["id"], c["confidence"]) for c in found.details["inner"]] == [(INNER, "likely")]
    assert found.policy_group(0) == ("docker", VICTIM)


def test_innermost_confirmed_container_wins(tmp_path: Path) -> None:
    """EKS on Fargate: the ECS task (no state here) holds a pod whose containerd container is confirmed."""
    cid = INNER
    task = "1f2e3d4c5b6a79881f2e3d4c5b6a7988"
    cgroup = f"/ecs/{task}/kubepods/besteffort/pod5d0f3a8e-1c2b-4e7a-9b61-0c3f2e4d5a6b/{cid}"
    state = tmp_path / "run/containerd/runc/k8s.io" / cid
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"init_process_pid": INIT, "config": {"labels": []}}))
    _proc(tmp_path, INIT, cgroup, CONTAINER_NS)
    found = _resolve(tmp_path, cgroup, [CONTAINER_NS, HOST_NS])
    assert (found.runtime, found.id, found.confidence) == ("containerd", cid, "certain")
    assert [(c["runtime"], c["id"]) for c in found.details["outer"]] == [("ecs", task)]
    assert found.policy_group(0) == ("containerd", cid)


@pytest.mark.parametrize("scope", [
    f"docker-{VICTIM}.scope", f"libpod-{VICTIM}.scope", f"crio-{VICTIM}.scope",
    f"kubepods-besteffort-pod5d0f3a8e_1c2b_4e7a_9b61_0c3f2e4d5a6b.slice/cri-containerd-{VICTIM}.scope",
    "lxc.payload.victim"])
def test_a_scope_in_a_users_delegated_subtree_is_that_users(root: Path, scope: str) -> None:
    """Even with the victim's real state and (say) its namespaces, a cgroup below user@1000.service is user
    1000's: at most their rootless container, never the victim."""
    cgroup = f"/user.slice/user-1000.slice/user@1000.service/app.slice/{scope}"
    _proc(root, 4343, cgroup, CONTAINER_NS)
    found = _resolve(root, cgroup, [CONTAINER_NS, HOST_NS], pid=4343)
    assert found.confidence == "likely" and found.details["rootless"] is True and found.details["owner_uid"] == 1000
    assert "delegates to uid 1000" in found.details["unconfirmed"]
    assert found.policy_group(100999) == ("uid", "1000")


def test_forged_hostname_mount_is_not_enough(root: Path) -> None:
    """A user namespace bind-mounting the victim's hostname file over /etc/hostname, in no container cgroup."""
    mountinfo = (f"600 500 0:50 /var/lib/docker/containers/{VICTIM}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n")
    found = _resolve(root, "/user.slice/user-1000.slice/session-3.scope", [INNER_NS, HOST_NS], mountinfo=mountinfo)
    assert (found.runtime, found.id, found.source) == ("docker", VICTIM, "mountinfo+state")
    assert found.confidence == "likely" and "PID namespace" in found.details["unconfirmed"]
    assert found.policy_group(1000) == ("uid", "1000")
    assert found.name is None and found.details["state_says"] == {"name": "victim", "image": "shop/web:1"}


def _podman(root: Path, cid: str, init: int, conmon: int) -> None:
    userdata = root / "run/containers/storage/overlay-containers" / cid / "userdata"
    userdata.mkdir(parents=True)
    (userdata / "pidfile").write_text(str(init))
    (userdata / "conmon.pid").write_text(str(conmon))
    listing = root / "var/lib/containers/storage/overlay-containers/containers.json"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"id": cid, "names": ["web"], "image": "abc", "metadata": "{}"}]))


def test_podman_monitor_is_the_recorded_conmon(tmp_path: Path) -> None:
    scope = f"/machine.slice/libpod-conmon-{VICTIM}.scope"
    _podman(tmp_path, VICTIM, INIT, 4141)
    _proc(tmp_path, 4141, scope, HOST_NS, "mnt:[4026531840]")
    found = _resolve(tmp_path, scope, [HOST_NS], "mnt:[4026531840]", pid=4141)
    assert (found.runtime, found.id, found.name, found.details["monitor"]) == ("podman", VICTIM, "web", "conmon")
    assert found.confidence == "certain" and found.policy_group(0) == ("podman", VICTIM)
    other = _resolve(tmp_path, scope, [HOST_NS], "mnt:[4026531840]", pid=4142)
    assert other.confidence == "likely" and "not the container's conmon" in other.details["unconfirmed"]


def test_podman_init_from_conmons_pidfile(tmp_path: Path) -> None:
    scope = f"/machine.slice/libpod-{VICTIM}.scope"
    _podman(tmp_path, VICTIM, INIT, 4141)
    _proc(tmp_path, INIT, scope, CONTAINER_NS)
    found = _resolve(tmp_path, scope, [CONTAINER_NS, HOST_NS])
    assert (found.name, found.confidence, found.details["init_pid"]) == ("web", "certain", INIT)


@pytest.mark.parametrize("state_dir", ["run/runc", "run/containerd/runc/garden"])
def test_garden_confirmed_by_runc_state(tmp_path: Path, state_dir: str) -> None:
    handle = "0b4f7a32-3d1e-4c5a-7f6e-21d3"
    cgroup = f"/system.slice/garden.service/garden/{handle}"
    (tmp_path / state_dir / handle).mkdir(parents=True)
    (tmp_path / state_dir / handle / "state.json").write_text(json.dumps({"init_process_pid": INIT}))
    _proc(tmp_path, INIT, cgroup, CONTAINER_NS)
    found = _resolve(tmp_path, cgroup, [CONTAINER_NS, HOST_NS])
    assert (found.runtime, found.id, found.confidence) == ("garden", handle, "certain")
    assert found.policy_group(0) == ("garden", handle)


def test_custom_parent_confirmed_by_docker_state(root: Path) -> None:
    cgroup = f"/mygroup/{VICTIM}"
    (root / "proc" / str(INIT) / "cgroup").write_text(f"0::{cgroup}\n")
    found = _resolve(root, cgroup, [CONTAINER_NS, HOST_NS])
    assert (found.runtime, found.confidence) == ("docker", "certain")


def test_systemd_literal_form_confirmed_by_containerd_state(tmp_path: Path) -> None:
    cgroup = f"/system.slice/containerd.service/kubepods-burstable-pod5d0f3a8e_1c2b_4e7a_9b61_0c3f2e4d5a6b.slice" \
             f":cri-containerd:{INNER}"
    state = tmp_path / "run/containerd/runc/k8s.io" / INNER
    bundle = tmp_path / "run/containerd/io.containerd.runtime.v2.task/k8s.io" / INNER
    state.mkdir(parents=True)
    bundle.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"init_process_pid": INIT, "config": {"labels": [
        f"bundle=/{bundle.relative_to(tmp_path)}"]}}))
    (bundle / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-name": "app", "io.kubernetes.cri.sandbox-name": "web-1",
        "io.kubernetes.cri.sandbox-namespace": "shop"}}))
    _proc(tmp_path, INIT, cgroup, CONTAINER_NS)
    found = _resolve(tmp_path, cgroup, [CONTAINER_NS, HOST_NS])
    assert (found.runtime, found.name, found.pod_name, found.pod_namespace) == ("containerd", "app", "web-1", "shop")
    assert (found.pod_uid, found.details["qos"], found.confidence) == (
        "5d0f3a8e-1c2b-4e7a-9b61-0c3f2e4d5a6b", "burstable", "certain")


def test_host_policy_groups() -> None:
    system = containers.identify("0::/system.slice/cron.service\n")
    session = containers.identify("0::/user.slice/user-1000.slice/session-3.scope\n")
    delegated = containers.identify("0::/system.slice/ci.service/cron.service\n")
    assert system.policy_group(0) == ("host", "cron.service")
    assert session.policy_group(1000) == ("uid", "1000")
    assert delegated.policy_group(1000) == ("host", "ci.service"), "a service's own subtree stays that service's"


@contextlib.contextmanager
def _lxc_monitor(address: bytes, answer: bytes, uid: int = 0) -> Iterator[None]:
    """A process listening on an LXC command socket as ``uid`` that answers one request with ``answer``: what
    liblxc's monitor does for ``LXC_CMD_GET_INIT_PID`` (seen with strace on ``lxc-info -p``, LXC 5.0)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                server.bind(address)
                server.listen(1)
                os.write(ready_w, b"x")
                conn, _ = server.accept()
                conn.recv(64)
                conn.sendall(answer)
                conn.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        yield
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _lxc(root: Path) -> tuple:
    """An LXC container's directory under the lxcpath, its init in its payload cgroup; (name, cgroup)."""
    name = f"web-{uuid.uuid4().hex[:8]}"
    (root / "var/lib/lxc" / name).mkdir(parents=True)
    cgroup = f"/lxc.payload.{name}"
    _proc(root, INIT, f"{cgroup}/init.scope", CONTAINER_NS)
    return name, cgroup


def test_lxc_confirmed_by_its_monitors_init_pid(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root: the monitor's socket must be root's (SO_PEERCRED)")
    name, cgroup = _lxc(tmp_path)
    address = lxc.command_socket("/var/lib/lxc", name)
    with _lxc_monitor(address, struct.pack("iIP", 0, 0, INIT)):
        found = _resolve(tmp_path, f"{cgroup}/system.slice/nginx.service", [CONTAINER_NS, HOST_NS])
    assert (found.runtime, found.id, found.confidence, found.details["init_pid"]) == ("lxc", name, "certain", INIT)
    assert found.source == "cgroup+state+pidns" and found.policy_group(1000) == ("lxc", name)


def test_lxc_socket_of_another_uid_or_no_monitor_confirms_nothing(tmp_path: Path) -> None:
    """A user who binds the victim's command socket name (abstract sockets are anyone's) is not its monitor;
    a container whose monitor is gone (stopped) is not confirmed either."""
    need(os.geteuid() == 0, "needs root to answer as another uid")
    name, cgroup = _lxc(tmp_path)
    with _lxc_monitor(lxc.command_socket("/var/lib/lxc", name), struct.pack("iIP", 0, 0, INIT), uid=65534):
        forged = _resolve(tmp_path, cgroup, [CONTAINER_NS, HOST_NS])
    stopped = _resolve(tmp_path, cgroup, [CONTAINER_NS, HOST_NS])
    for found, why in ((forged, "belongs to uid 65534, not root"), (stopped, "not running")):
        assert found.confidence == "likely" and found.policy_group(1000) == ("uid", "1000")
        assert why in found.errors[0] and "does not confirm" in found.details["unconfirmed"]


def test_lxc_command_socket_names() -> None:
    """As liblxc names them; the hashed form is what a real ``lxc-start`` of a 96-character name bound here."""
    assert lxc.command_socket("/var/lib/lxc", "web1") == b"\0/var/lib/lxc/web1/command"
    assert lxc.command_socket("/var/lib/lxc", "cpt11-" + "x" * 90) == b"\0lxc/a169c497f8e98284/command"


def test_docker_init_from_runcs_state_before_dockerd_records_it(tmp_path: Path) -> None:
    """The init crashes at once: config.v2.json does not say Running yet, runc's state for Docker has the init."""
    _docker(tmp_path, VICTIM, 0, running=False)
    runc_state = tmp_path / "run/docker/runtime-runc/moby" / VICTIM
    runc_state.mkdir(parents=True)
    (runc_state / "state.json").write_text(json.dumps({"id": VICTIM, "init_process_pid": INIT}))
    _proc(tmp_path, INIT, SCOPE, CONTAINER_NS)
    found = _resolve(tmp_path, SCOPE, [CONTAINER_NS, HOST_NS], pid=INIT)
    assert (found.confidence, found.details["init_pid"], found.name) == ("certain", INIT, "victim")
    (runc_state / "state.json").unlink()
    gone = _resolve(tmp_path, SCOPE, [CONTAINER_NS, HOST_NS], pid=INIT)
    assert gone.confidence == "likely" and "records no init process" in gone.details["unconfirmed"]
