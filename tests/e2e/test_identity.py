"""Issue 11 through the real kernel: identities only the runtime's own state and the kernel's namespaces
confirm, and forgeries by an unprivileged user that must neither be filed under their victim nor spend its
limits or evict its cores.

The victim is a real Docker container; the forger is an unprivileged uid with a cgroup subtree of its own
(as systemd delegates ``user@UID.service`` to every user: made here under the test's cgroup parent and
chowned to it), a user namespace, and any command line it likes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from cgroups import FakeContainers, crash_in, remove_everywhere
from runtimes import unique
from support import NO_RATE_LIMIT, installed_handler, mounted_tmpfs, need, served_handler, set_core_limit, wait_for

FORGER = 54321
CONFIG = "rate_limit_container = 2\nrate_limit_exe = 0\ncontainer_max_cores = 2\nrate_limit_window = 3600\n"


def _fake_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


@pytest.fixture
def victim(docker_image: str):
    """A running Docker container that crashes on request (``docker exec``); yields (name, id)."""
    name = unique("corepipe-11")
    subprocess.run(["docker", "run", "-d", "--name", name, "--network=none", "--ulimit", "core=-1", docker_image,
                    "sleep", "600"], check=True, capture_output=True, timeout=120)
    cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], check=True, capture_output=True,
                         text=True).stdout.strip()
    yield name, cid
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def _victim_crash(name: str, comm: str) -> None:
    subprocess.run(["docker", "exec", name, "/crasher", "0", comm], capture_output=True, timeout=120)


def _as_forger(argv: list, cgroup: Path = None, **kwargs) -> subprocess.CompletedProcess:
    """``argv`` as the unprivileged uid FORGER (in ``cgroup`` if given), with core dumps on."""
    limit = set_core_limit(resource.RLIM_INFINITY)

    def preexec() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        limit()
        os.setgroups([])
        os.setgid(FORGER)
        os.setuid(FORGER)
    return subprocess.run(argv, preexec_fn=preexec, capture_output=True, timeout=120, **kwargs)


@pytest.fixture
def forger(handler_dir: Path, crasher: Path, fake_containers: FakeContainers) -> tuple:
    """The forger's own world: a home with a crasher it may run (and where it may forge files), and the
    ``app.slice`` of the cgroup subtree delegated to it (``user@FORGER.service``); yields (home, app.slice)."""
    home = handler_dir / "forger"
    home.mkdir()
    shutil.copy2(crasher, home / "crasher")
    os.chown(home, FORGER, FORGER)
    app = fake_containers.parent / "user.slice" / f"user-{FORGER}.slice" / f"user@{FORGER}.service" / "app.slice"
    app.mkdir(parents=True)
    for path in (app, app / "cgroup.procs"):
        os.chown(path, FORGER, FORGER)
    return home, app


@pytest.mark.parametrize("mode", ["pipe", "socket"])
def test_forgeries_by_an_unprivileged_user_never_reach_the_victim(victim: tuple, handler_dir: Path, forger: tuple,
                                                                  mode: str) -> None:
    """The same in pipe mode (``corepipe collect``) and socket mode (``corepipe serve`` decides on the identity
    before the dump, then stores the crash in-process): the same confirmation, the same records."""
    need(shutil.which("unshare") is not None, "needs unshare")
    name, vid = victim
    home, app = forger
    evil = home / "crasher"
    serve = served_handler if mode == "socket" else installed_handler
    with serve(handler_dir, CONFIG) as handler:
        _victim_crash(name, "victim1")
        first = handler.wait_record(lambda r: r["comm"] == "victim1")
        forged = []
        # 1. docker-<victim id>.scope (then a fresh fake id per crash, and other runtimes' names) in its subtree.
        pod = f"kubepods-besteffort-pod{str(uuid.uuid4()).replace('-', '_')}.slice"
        for i, scope in enumerate([f"docker-{vid}.scope", f"docker-{_fake_id()}.scope", f"docker-{_fake_id()}.scope",
                                   f"libpod-{vid}.scope", f"crio-{vid}.scope", f"{pod}/cri-containerd-{vid}.scope",
                                   f"lxc.payload.{name}"]):
            script = f'mkdir -p {app}/{scope} && echo $$ > {app}/{scope}/cgroup.procs && exec {evil} 0 scope{i}'
            _as_forger(["sh", "-c", script], cgroup=app)
            forged.append(f"scope{i}")
        # 2. The victim's hostname file, forged and bind-mounted over /etc/hostname in a user namespace.
        fake = home / "var/lib/docker/containers" / vid
        script = (f"mkdir -p {fake} && echo {vid[:12]} > {fake}/hostname && "
                  f"mount --bind {fake}/hostname /etc/hostname && hostname {vid[:12]} && exec {evil} 0 hostname")
        proc = _as_forger(["unshare", "-Urmu", "sh", "-c", script])
        need(b"Operation not permitted" not in proc.stderr, f"unprivileged user namespaces: {proc.stderr[-200:]}")
        forged.append("hostname")
        # 3. A process named conmon, with the victim's id and a name, as the crasher's parent in a libpod scope.
        scope = f"libpod-{vid}.scope"
        script = (f'echo $$ > {app}/{scope}/cgroup.procs && exec -a /usr/bin/conmon sh -c '
                  f'"{evil} 0 conmon; true" /usr/bin/conmon -c {vid} -n victim-name')
        _as_forger(["bash", "-c", script], cgroup=app)
        forged.append("conmon")
        recs = {r["comm"]: r for r in (handler.wait_record(lambda r, c=c: r["comm"] == c) for c in forged)}
        _victim_crash(name, "victim2")
        second = handler.wait_record(lambda r: r["comm"] == "victim2")
    own = handler.store / "docker" / vid
    assert Path(first["_dir"]).parent == own and Path(second["_dir"]).parent == own
    assert first["container"]["confidence"] == "certain" and second["core"]["stored"] is True
    assert (Path(first["_dir"]) / "core.zst").exists(), "the victim lost its core"
    assert sorted(p.parent.name for p in own.glob("*/record.json")) == sorted(
        [Path(first["_dir"]).name, Path(second["_dir"]).name]), "a forgery was filed under the victim"
    for comm, rec in recs.items():
        container = rec["container"]
        assert Path(rec["_dir"]).parent == handler.store / "uid" / str(FORGER), (comm, rec["_dir"])
        assert container["confidence"] != "certain" and container["details"]["unconfirmed"], (comm, container)
        # No name the victim's state gives (an LXC container's name is its id, seen in the cgroup).
        assert container["name"] in (None, container["id"]) and container["image"] is None, (comm, container)
        if comm != "hostname":  # in its delegated subtree: its own rootless container at most, attributed to it
            assert container["details"]["rootless"] is True and container["details"]["owner_uid"] == FORGER, comm
    seen = recs["hostname"]["container"]
    assert seen["id"] == vid and seen["source"].startswith("mountinfo")
    assert seen["details"]["state_says"]["name"] == name, "what the victim's state says is kept apart"
    # The forger's crashes, whatever ids they showed, count against one group: its uid's.
    stored = [recs[c]["core"]["stored"] for c in forged]
    assert stored.count(True) == 2 and all(recs[c]["core"]["reason"].startswith("rate limited")
                                           for c, kept in zip(forged, stored) if not kept)
    rate = json.loads((handler.store / ".state.json").read_text())["rate"]
    assert len(rate[f"container:docker/{vid}"]) == 2


def test_a_forgers_flood_of_fake_ids_evicts_only_its_own_cores(victim: tuple, handler_dir: Path,
                                                               forger: tuple) -> None:
    """Big crashes, each in a fresh ``docker-<fake id>.scope`` of the forger's subtree, until the store is over
    max_use: making room takes the forger's own oldest cores (one group, its uid's), never the victim's."""
    name, vid = victim
    home, app = forger
    max_use = 6 << 20
    config = f"max_use = {max_use}\nkeep_free = 0\n" + NO_RATE_LIMIT
    with mounted_tmpfs(handler_dir / "store", "64m"), installed_handler(handler_dir, config) as handler:
        _victim_crash(name, "victim")
        victim_rec = handler.wait_record(lambda r: r["comm"] == "victim")
        flood = [f"flood{i}" for i in range(6)]
        for comm in flood:
            scope = app / f"docker-{_fake_id()}.scope"
            _as_forger(["sh", "-c", f"mkdir {scope} && echo $$ > {scope}/cgroup.procs && exec {home}/crasher 4 {comm}"],
                       cgroup=app)
            handler.wait_record(lambda r, c=comm: r["comm"] == c)
        recs = {r["comm"]: r for r in handler.records()}
        kept = (Path(victim_rec["_dir"]) / "core.zst").exists()  # before the store's tmpfs goes
    assert Path(victim_rec["_dir"]).parent == handler.store / "docker" / vid
    assert recs["victim"]["core"]["stored"] and kept, "the victim lost its core"
    stored = [recs[c]["core"]["stored"] for c in flood]
    assert stored[0] is False and stored[-1] is True and stored == sorted(stored), stored
    for comm in flood:
        assert Path(recs[comm]["_dir"]).parent == handler.store / "uid" / str(FORGER)
        if not recs[comm]["core"]["stored"]:
            assert f"uid/{FORGER} uses the most" in recs[comm]["core"]["reason"], recs[comm]["core"]


def test_outside_user_slice_the_namespaces_decide(victim: tuple, handler_dir: Path, crasher: Path,
                                                  system_unit: Path) -> None:
    """Where no ``user@UID.service`` marks a subtree as a user's, the kernel's namespaces still decide: the forger's
    ``docker-<victim id>.scope`` in a system service's subtree delegated to it (``Delegate=yes`` with ``User=``),
    and a host process that root moved into the victim's very cgroup. Neither is in the PID namespace of the
    init Docker's state records, so each counts under its own uid, and the victim's name is not theirs."""
    name, vid = victim
    exe = handler_dir / "crasher"
    shutil.copy2(crasher, exe)
    for path in (system_unit, system_unit / "cgroup.procs"):
        os.chown(path, FORGER, FORGER)
    init = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", name], check=True, capture_output=True,
                          text=True).stdout.strip()
    own = next(line.split(":", 2)[2] for line in Path(f"/proc/{init}/cgroup").read_text().splitlines()
               if line.split(":")[1] == "pids")
    limit = set_core_limit(resource.RLIM_INFINITY)
    enter = FakeContainers.join_dir(Path("/sys/fs/cgroup/pids" + own))

    def into_victim() -> None:
        enter()
        limit()
    with installed_handler(handler_dir, CONFIG) as handler:
        scope = system_unit / f"docker-{vid}.scope"
        _as_forger(["sh", "-c", f"mkdir {scope} && echo $$ > {scope}/cgroup.procs && exec {exe} 0 svcscope"],
                   cgroup=system_unit)
        subprocess.run([str(exe), "0", "intovictim"], preexec_fn=into_victim, capture_output=True, timeout=120)
        forged = handler.wait_record(lambda r: r["comm"] == "svcscope")
        moved = handler.wait_record(lambda r: r["comm"] == "intovictim")
    for rec, uid, why in ((forged, FORGER, "is not in the container's cgroup"),
                          (moved, os.getuid(), "not in the PID namespace of the container's init")):
        container = rec["container"]
        assert (container["runtime"], container["id"]) == ("docker", vid), container
        assert container["confidence"] != "certain" and why in container["details"]["unconfirmed"], container
        assert container["name"] is None and container["details"]["state_says"]["name"] == name
        assert Path(rec["_dir"]).parent == handler.store / "uid" / str(uid) and rec["core"]["stored"]
    assert not (handler.store / "docker").exists()


def test_docker_custom_cgroup_parent(kernel_handler, docker_image: str) -> None:
    """``docker run --cgroup-parent``: a 64-hex leaf in an unfamiliar path that Docker's state confirms."""
    parent = f"/{unique('corepipe-11-parent')}"
    name = unique("corepipe-11")
    try:
        subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1", "--cgroup-parent",
                        parent, docker_image, "/crasher", "0", "cgparent"], capture_output=True, timeout=120)
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], check=True, capture_output=True,
                             text=True).stdout.strip()
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "cgparent")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        remove_everywhere(parent)
    container = rec["container"]
    assert (container["runtime"], container["id"], container["name"]) == ("docker", cid, name)
    assert container["cgroup"] == f"{parent}/{cid}" and container["confidence"] == "certain", container
    assert Path(rec["_dir"]).parent == kernel_handler.store / "docker" / cid and rec["core"]["stored"]


def test_an_unconfirmed_hex_leaf_is_unknown_never_host(kernel_handler, crasher: Path,
                                                       fake_containers: FakeContainers) -> None:
    """A 64-hex leaf under a custom parent (as Nomad or nerdctl make one) that no runtime's state names: an
    ``unknown`` runtime with the id that was seen, counted under the crashing uid, never the host."""
    cid = _fake_id()
    leaf = fake_containers.parent / "nomad" / cid
    leaf.mkdir(parents=True)
    crash_in(fake_containers, leaf, [str(crasher), "0", "hexleaf"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "hexleaf")
    container = rec["container"]
    assert (container["runtime"], container["id"]) == ("unknown", cid), container
    assert container["cgroup"].endswith(f"/nomad/{cid}") and container["confidence"] != "certain"
    assert "does not confirm" in container["details"]["unconfirmed"]
    assert Path(rec["_dir"]).parent == kernel_handler.store / "uid" / str(os.getuid()) and rec["core"]["stored"]


def test_a_pid_namespace_nested_in_a_container_is_that_container(kernel_handler, docker_image: str) -> None:
    """A process in a PID namespace of its own inside a Docker container (as an inner runtime makes one): the
    outer container, confirmed because the process's PID namespace descends from its init's."""
    name = unique("corepipe-11")
    subprocess.run(["docker", "run", "-d", "--name", name, "--network=none", "--ulimit", "core=-1", "--cap-add",
                    "SYS_ADMIN", "--security-opt", "seccomp=unconfined", docker_image, "sleep", "600"],
                   check=True, capture_output=True, timeout=120)
    try:
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], check=True, capture_output=True,
                             text=True).stdout.strip()
        run = subprocess.run(["docker", "exec", name, "/bin/busybox", "unshare", "-p", "-f", "/crasher", "0", "nested"],
                             capture_output=True, timeout=120)
        need(b"Operation not permitted" not in run.stderr, f"unshare -p in the container: {run.stderr[-200:]}")
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "nested")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    container = rec["container"]
    assert (container["runtime"], container["id"], container["confidence"]) == ("docker", cid, "certain"), container
    assert container["details"]["nested_pid_ns"] is True and rec["ns_pid"] == 1
    assert Path(rec["_dir"]).parent == kernel_handler.store / "docker" / cid


#: An outer container that can run dockerd: every capability this host's bounding set has (it lacks
#: CAP_SYS_RESOURCE, so ``--privileged`` itself fails here), its own cgroup namespace, the host's binaries.
DIND = ["--cgroupns=private", "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
        "--security-opt", "apparmor=unconfined", "--network=none", "-v", "/usr:/usr:ro", "-v", "/lib:/lib:ro",
        "-v", "/lib64:/lib64:ro", "--tmpfs", "/var/lib/docker:exec", "--tmpfs", "/run:exec"]
#: Inside it, as docker:dind's entrypoint does: the cgroup hierarchies mounted read-write (its own subtree),
#: then containerd and dockerd (vfs storage, no network).
DIND_START = ('for m in $(grep " cgroup " /proc/mounts | cut -d" " -f2); do '
              'o=$(grep " $m " /proc/mounts | cut -d" " -f4 | tr , "\\n" | grep -v "^ro$" | tr "\\n" ,); '
              'umount "$m" && mount -t cgroup -o "${o%,}" cgroup "$m"; done; export PATH=/usr/sbin:/usr/bin:/bin; '
              'containerd >/run/containerd.log 2>&1 & exec dockerd --bridge=none --iptables=false --ip6tables=false '
              '--storage-driver=vfs --containerd=/run/containerd/containerd.sock >/run/dockerd.log 2>&1')


def test_docker_in_docker(kernel_handler, docker_image: str, rootfs: Path) -> None:
    """A crash in a container that a dockerd inside a Docker container runs: the outer container, confirmed by
    the host's Docker state (the process's PID namespace descends from its init's), with the inner one recorded
    in details.inner (its state lives in the outer container's filesystem, which the host does not trust)."""
    name = unique("corepipe-11-dind")
    subprocess.run(["docker", "run", "-d", "--name", name, *DIND, "-v", f"{rootfs}:/inner:ro", docker_image,
                    "/bin/sh", "-c", DIND_START], check=True, capture_output=True, timeout=120)
    inner_docker = ["docker", "exec", name, "/usr/bin/docker"]
    try:
        outer = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], check=True, capture_output=True,
                               text=True).stdout.strip()
        wait_for(lambda: subprocess.run([*inner_docker, "info"], capture_output=True).returncode == 0, 120,
                 "dockerd inside the container")
        subprocess.run(["docker", "exec", name, "/bin/sh", "-c", "/bin/busybox tar -C /inner -c . | "
                        "/usr/bin/docker import - inner:1"], check=True, capture_output=True, timeout=120)
        run = subprocess.run([*inner_docker, "run", "--name", "in1", "--network=none", "--ulimit", "core=-1",
                              "inner:1", "/crasher", "0", "dind"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 139, run.stderr
        inner = subprocess.run([*inner_docker, "inspect", "-f", "{{.Id}}", "in1"], check=True, capture_output=True,
                               text=True).stdout.strip()
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "dind")
    finally:
        subprocess.run([*inner_docker, "rm", "-f", "in1"], capture_output=True, timeout=60)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    container = rec["container"]
    assert (container["runtime"], container["id"], container["confidence"]) == ("docker", outer, "certain"), container
    assert container["cgroup"].endswith(f"/docker/{outer}/docker/{inner}") and container["details"]["nested_pid_ns"]
    [seen] = container["details"]["inner"]
    assert (seen["runtime"], seen["id"], seen["confidence"]) == ("docker", inner, "likely")
    assert "does not confirm" in seen["unconfirmed"]
    assert Path(rec["_dir"]).parent == kernel_handler.store / "docker" / outer and rec["core"]["stored"]


@pytest.fixture
def system_unit() -> Path:
    """A cgroup as systemd makes one for a system service, ``system.slice/<unit>`` in the v2 hierarchy (what
    corepipe reads first), made by hand (no systemd here) and removed afterwards with the cgroups made in it."""
    root = next((r for r in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
                 if (r / "cgroup.controllers").exists()), None)
    need(root is not None and os.access(root, os.W_OK), "needs a writable cgroup2 hierarchy (root)")
    made = [d for d in (root / "system.slice",) if not d.exists()]
    unit = root / "system.slice" / f"{unique('corepipe-11')}.service"
    unit.mkdir(parents=True)
    yield unit
    for directory in (*unit.glob("*/"), unit, *made):  # with the cgroups a test made below the unit
        directory.rmdir()


def test_host_processes_count_per_system_unit_or_uid(handler_dir: Path, crasher: Path, system_unit: Path) -> None:
    """A root daemon in a system unit, then a flood of crashes by an unprivileged user: the user's crashes count
    under its uid, so the daemon keeps its core and its rate limit (one shared ``host`` bucket gave both away)."""
    exe = handler_dir / "crasher"
    shutil.copy2(crasher, exe)
    unit = system_unit.name

    limit = set_core_limit(resource.RLIM_INFINITY)

    def in_unit() -> None:
        (system_unit / "cgroup.procs").write_text(str(os.getpid()))
        limit()

    def daemon(comm: str) -> None:
        subprocess.run([str(exe), "0", comm], preexec_fn=in_unit, capture_output=True, timeout=120)
    with installed_handler(handler_dir, CONFIG) as handler:
        daemon("daemon1")
        first = handler.wait_record(lambda r: r["comm"] == "daemon1")
        flood = [f"user{i}" for i in range(4)]
        for comm in flood:
            _as_forger([str(exe), "0", comm])
        users = [handler.wait_record(lambda r, c=c: r["comm"] == c) for c in flood]
        daemon("daemon2")
        second = handler.wait_record(lambda r: r["comm"] == "daemon2")
    own = handler.store / "host" / unit
    assert Path(first["_dir"]).parent == own and Path(second["_dir"]).parent == own
    assert first["container"]["details"]["system_unit"] == unit
    assert second["core"]["stored"] and (Path(first["_dir"]) / "core.zst").exists(), "the daemon lost a core"
    assert all(Path(r["_dir"]).parent == handler.store / "uid" / str(FORGER) for r in users)
    assert [r["core"]["stored"] for r in users].count(True) == 2
    rate = json.loads((handler.store / ".state.json").read_text())["rate"]
    assert len(rate[f"container:host/{unit}"]) == 2 and len(rate[f"container:uid/{FORGER}"]) == 2


def _move_to(pid: int, relative: str) -> list:
    """Move ``pid`` into the cgroup ``relative`` (made as needed) in every hierarchy, as a runtime that uses the
    systemd cgroup driver places its containers; the directories made, deepest first, for removal."""
    made = []
    for top in sorted(Path("/sys/fs/cgroup").iterdir()):
        if not (top / "cgroup.procs").exists():
            continue
        directory = top / relative.strip("/")
        parts = []
        for parent in [*reversed(directory.relative_to(top).parents)][1:] + [directory.relative_to(top)]:
            path = top / parent
            if not path.exists():
                path.mkdir()
                parts.append(path)
                for name in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset takes no task before these are set
                    if (path / name).exists():
                        (path / name).write_text((path.parent / name).read_text())
        (directory / "cgroup.procs").write_text(str(pid))
        made += reversed(parts)
    return made


def test_a_container_placed_as_the_systemd_cgroup_driver_places_it(kernel_handler, docker_image: str) -> None:
    """Docker with the systemd cgroup driver puts a container in ``system.slice/docker-<id>.scope``. This host runs
    no systemd, so the container (a real one, with Docker's real state) is moved there by the test before it
    crashes: the record is the container's, confirmed by Docker's state and the PID namespace."""
    name = unique("corepipe-sdcg")
    parent = unique("corepipe-sdcg-parent")
    made: list = []
    try:
        subprocess.run(["docker", "run", "-d", "--name", name, "--network=none", "--ulimit", "core=-1", docker_image,
                        "/bin/busybox", "sh", "-c", "while [ ! -e /go ]; do sleep 0.1; done; exec /crasher 0 sdcg"],
                       check=True, capture_output=True, timeout=120)
        inspect = subprocess.run(["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}}", name], check=True,
                                 capture_output=True, text=True).stdout.split()
        cid, pid = inspect[0], int(inspect[1])
        made = _move_to(pid, f"{parent}/system.slice/docker-{cid}.scope")
        lines = Path(f"/proc/{pid}/cgroup").read_text()
        assert f"/system.slice/docker-{cid}.scope" in lines and f"/docker/{cid}" not in lines, lines
        subprocess.run(["docker", "exec", name, "/bin/busybox", "touch", "/go"], check=True, capture_output=True,
                       timeout=60)
        rec = kernel_handler.wait_record(lambda r: r["comm"] == "sdcg")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        for directory in made:
            wait_for(lambda d=directory: not (d / "cgroup.procs").read_text().split(), 30, f"{directory} empty")
            directory.rmdir()
    container = rec["container"]
    assert (container["runtime"], container["id"], container["name"]) == ("docker", cid, name), container
    assert container["cgroup"].endswith(f"/system.slice/docker-{cid}.scope"), container
    assert container["confidence"] == "certain", container
    assert Path(rec["_dir"]).parent == kernel_handler.store / "docker" / cid and rec["core"]["stored"]
