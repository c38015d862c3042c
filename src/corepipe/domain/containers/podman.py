"""Podman: ``libpod-<id>`` (cgroupfs driver, under ``libpod_parent``) and ``libpod-<id>.scope`` (systemd).

``libpod-conmon-<id>.scope`` (systemd driver) holds the container's monitor, conmon: its crash belongs
to that container, marked ``details.monitor``. conmon writes the container's init PID to
``userdata/pidfile`` and its own to ``userdata/conmon.pid`` under the run root (CRI-O's conmon too).

Names and images live in containers/storage, not in the OCI bundle: ``<driver>-containers/
containers.json`` under the graph root (``volatile-containers.json`` under the run root for
``--rm`` containers) lists each container's names and image; ``<driver>-images/images.json``
names the image when the container's metadata does not.
"""

from __future__ import annotations

import json
from typing import Optional

from corepipe.domain.containers import cgroup, runc, state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID
from corepipe.platform import procfs

NAME = "podman"
ENRICHES = (NAME,)
GRAPH_ROOT = "var/lib/containers/storage"
RUN_ROOT = "run/containers/storage"
DRIVERS = ("overlay", "vfs", "btrfs", "zfs")


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        cid = cgroup.scope_id(seg, "libpod-conmon-")
        if seg.endswith(".scope") and HEX_ID.fullmatch(cid):
            return i, Container(runtime=NAME, id=cid, details={"monitor": "conmon"})
        cid = cgroup.scope_id(seg, "libpod-")
        if HEX_ID.fullmatch(cid):
            return i, Container(runtime=NAME, id=cid)
    return None


def storage_entry(cid: str, deadline: state.Deadline, root: str) -> tuple:
    """(container entry, driver) from containers/storage's lists, or (None, None)."""
    for driver in DRIVERS:
        for base, file in ((GRAPH_ROOT, "containers.json"), (RUN_ROOT, "volatile-containers.json")):
            listing = state.path(root, base, f"{driver}-containers", file)
            if not state.exists(listing):
                continue
            for entry in state.read_json(listing, deadline):
                if isinstance(entry, dict) and entry.get("id") == cid:
                    return entry, driver
    return None, None


def bundle_config(cid: str, deadline: state.Deadline, root: str) -> Optional[dict]:
    """The OCI config.json conmon started the container from (run root first, then graph root)."""
    for base in (RUN_ROOT, GRAPH_ROOT):
        for driver in DRIVERS:
            file = state.path(root, base, f"{driver}-containers", cid, "userdata", "config.json")
            if state.exists(file):
                return state.read_json(file, deadline)
    return None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.id or not HEX_ID.fullmatch(container.id):
        return
    conmon_pids(container, deadline, root)
    if container.details.get("init_pid") or container.details.get("monitor_pid"):
        container.state_confirmed()  # conmon's pid files in the run root: the container is running
    entry, driver = storage_entry(container.id, deadline, root)
    if entry is None:
        raise FileNotFoundError(f"container {container.id[:12]} is not in containers/storage's lists")
    names = [n for n in entry.get("names") or [] if state.text(n)]
    container.name = names[0] if names else container.name
    try:
        metadata = json.loads(entry.get("metadata") or "{}")
    except ValueError:
        metadata = {}
    image_id = state.text(entry.get("image"))
    container.image = state.text(metadata.get("image-name")) or _image_name(image_id, driver, deadline, root)
    container.details["image_id"] = image_id
    container.details["storage_driver"] = driver
    container.state_confirmed()


def conmon_pids(container: Container, deadline: state.Deadline, root: str) -> None:
    """The init PID conmon wrote (else runc's state), and conmon's own PID, into ``details``."""
    for driver in DRIVERS:
        userdata = state.path(root, RUN_ROOT, f"{driver}-containers", container.id, "userdata")
        if state.exists(userdata):
            for file, key in (("pidfile", "init_pid"), ("conmon.pid", "monitor_pid"),
                              ("conmon-pidfile", "monitor_pid")):
                if state.exists(state.path(userdata, file)):
                    container.details[key] = state.read_pid(state.path(userdata, file), deadline)
            break
    if not container.details.get("init_pid") and state.exists(runc.state_file(state.path(root, runc.STATE_ROOT),
                                                                              container.id)):
        runc.read_state(state.path(root, runc.STATE_ROOT), container.id, container, deadline)


def _image_name(image_id: Optional[str], driver: str, deadline: state.Deadline, root: str) -> Optional[str]:
    if not image_id:
        return None
    listing = state.path(root, GRAPH_ROOT, f"{driver}-images", "images.json")
    if not state.exists(listing):
        return None
    for image in state.read_json(listing, deadline):
        if isinstance(image, dict) and image.get("id") == image_id:
            names = [n for n in image.get("names") or [] if state.text(n)]
            return names[0] if names else None
    return None


def name_from_conmon(container: Container, pid: int, deadline: state.Deadline, root: str,
                     parent: Optional[int] = None) -> None:
    """The name on the command line of the container's conmon (``-c <id> -n <name>``), an ancestor of ``pid``
    (whose parent is ``parent`` if known). Only the conmon whose PID the run root records counts: anyone can
    start a process called conmon with any arguments."""
    monitor = container.details.get("monitor_pid")
    for _ in range(32):
        if parent is None:
            status = procfs.status_fields(state.read(state.path(root, "proc", str(pid), "status"), deadline, 65536))
            ppid = status.get("PPid", "")
            parent = int(ppid) if ppid.isdigit() else 0
        if parent <= 1:
            return
        pid, parent = parent, None
        if pid != monitor:
            continue
        args = state.read_proc_memory(root, pid, "cmdline", deadline, 65536).decode(
            errors="replace").split("\0")
        if not args[0].endswith("conmon"):
            return
        options = {flag: value for flag, value in zip(args, args[1:])}
        cid = options.get("-c") or options.get("--cid")
        name = options.get("-n") or options.get("--name")
        if cid == container.id and name:
            container.name = name
            container.details["name_from"] = "conmon"
        return
