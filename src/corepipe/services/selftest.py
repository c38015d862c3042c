"""Proving the whole path on this host: crash throwaway processes, find their records, verify, clean up.

A host process (``sh`` killing itself with SIGSEGV) always; a throwaway Docker container built
from /bin/busybox (busybox-static) when Docker is usable. Each crash is verified through what
the handler stored (record status, container id, the core's size, digest and ELF type), then
every record, container and image the selftest made is removed.
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import signal
import subprocess
import tarfile
import time
from typing import Callable, Optional

from corepipe.domain import catalog, containers
from corepipe.platform import digest, elf, procfs, unpack
from corepipe.platform.errors import UserError
from corepipe.platform.sysctl import CORE_PATTERN, Sysctl
from corepipe.services.install import Paths, load_state, socket_pattern

BUSYBOX = "/bin/busybox"
#: A shell that is not the container's PID 1 (init ignores signals it sends itself) crashes itself.
CONTAINER_COMMAND = ["/bin/sh", "-c", 'sh -c "kill -SEGV \\$\\$"; true']
Say = Callable[[str], None]


class SelftestError(UserError):
    """The path does not work; the message says where it broke."""


def run(paths: Paths, container: bool = True, timeout: float = 60.0, say: Say = print) -> None:
    state = load_state(paths.state)
    if state is None:
        raise SelftestError(f"corepipe is not installed (no {paths.state}); run 'corepipe install' first")
    current = Sysctl(paths.proc_sys).read(CORE_PATTERN)
    # In socket mode the running server's socket pattern is corepipe's too (install.sh starts the server
    # before it runs the selftest).
    if current not in (state["pattern"], socket_pattern(state)):
        raise SelftestError(f"kernel.core_pattern is {current!r}, not corepipe's; run 'corepipe install'")
    store = state["store"]
    say(f"store: {store}")
    _host_crash(store, timeout, say)
    if container:
        _container_crash(store, timeout, say)
    say("selftest passed; the crashes it made were removed")


def _unlimited_core() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (OSError, ValueError):  # no CAP_SYS_RESOURCE to raise the hard limit: go as high as it allows
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def _host_crash(store: str, timeout: float, say: Say) -> None:
    started = time.time()
    proc = subprocess.Popen(["/bin/sh", "-c", "kill -SEGV $$"], preexec_fn=_unlimited_core,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if proc.wait(timeout) != -signal.SIGSEGV:
        raise SelftestError(f"the test shell did not die of SIGSEGV (exit {proc.returncode})")

    def match(rec: dict) -> bool:
        return rec.get("pid") == proc.pid and (rec.get("timestamp") or 0) >= int(started) - 1

    path, rec = _wait_and_verify(store, match, timeout, "host process")
    # Filed where this process itself belongs: the host, or the pod/container selftest runs in, told from the
    # evidence the collector weighs (cgroup, then mounts: a container no cgroup names has a root mount of its own).
    cgroup, mountinfo = (procfs.read("self", name, procfs.PROC_LIMIT).decode("utf-8", "replace")
                         for name in ("cgroup", "mountinfo"))
    expected = containers.identify(cgroup, mountinfo=mountinfo)
    found = rec.get("container") or {}
    if (found.get("runtime"), found.get("id")) != (expected.runtime, expected.id):
        raise SelftestError(f"the crash was filed as {found.get('runtime')} {found.get('id')}, not as "
                            f"{expected.runtime} {expected.id} like the selftest itself: {path}")
    where = "host" if expected.is_host else f"{expected.runtime} {(expected.id or '')[:12]} (selftest's own)"
    say(f"host process: pid {proc.pid} (sh) SIGSEGV in {where} -> {path}: {_core_line(rec)}")


def _docker_usable(say: Say) -> Optional[str]:
    docker = shutil.which("docker")
    if docker is None:
        say("container: skipped (no docker on PATH)")
        return None
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        say("container: skipped (docker is installed but its daemon is not usable)")
        return None
    if not is_static(BUSYBOX):
        say(f"container: skipped (needs a static {BUSYBOX}: apt-get install busybox-static)")
        return None
    return docker


def is_static(path: str) -> bool:
    """An ELF executable without a program interpreter runs in an empty root file system."""
    try:
        with open(path, "rb") as f:
            return elf.has_interpreter(f.fileno()) is False
    except OSError:
        return False


def _rootfs_tar() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name in ("bin", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    return data.getvalue()


def _container_crash(store: str, timeout: float, say: Say) -> None:
    docker = _docker_usable(say)
    if docker is None:
        return
    started = time.time()
    tag = f"corepipe-selftest:{os.urandom(4).hex()}"
    name = tag.replace(":", "-")
    try:
        _docker(docker, ["import", "-", tag], input=_rootfs_tar())
        _docker(docker, ["run", "--name", name, "--network=none", "--ulimit", "core=-1", "--log-driver=none",
                         tag, *CONTAINER_COMMAND])
        container_id = _docker(docker, ["inspect", "-f", "{{.Id}}", name]).strip()

        def match(rec: dict) -> bool:
            # Picked by what the kernel says (%h: Docker's default hostname is the short id), then checked
            # against what corepipe worked out from the cgroup.
            return rec.get("hostname") == container_id[:12] and (rec.get("timestamp") or 0) >= int(started) - 1

        path, rec = _wait_and_verify(store, match, timeout, "container", throwaway_container=True)
        found = rec["container"]
        if (found.get("runtime"), found.get("id")) != ("docker", container_id):
            raise SelftestError(f"the container crash was filed as {found.get('runtime')} {found.get('id')}, "
                                f"not docker {container_id}: {path}")
        say(f"container: docker {container_id[:12]} ({found.get('name') or name}) pid {rec.get('pid')} "
            f"(ns pid {rec.get('ns_pid')}) SIGSEGV -> {path}: container id matches, {_core_line(rec)}")
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run([docker, "rmi", "-f", tag], capture_output=True, timeout=120)


def _docker(docker: str, args: list, input: Optional[bytes] = None) -> str:
    proc = subprocess.run([docker, *args], input=input, capture_output=True, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SelftestError(f"docker {args[0]} failed: {last}")
    return proc.stdout.decode(errors="replace")


def _wait_and_verify(store: str, match: Callable[[dict], bool], timeout: float, what: str,
                     throwaway_container: bool = False) -> tuple:
    """The finished record ``match`` picks, verified; every matching crash is removed afterwards, and with
    ``throwaway_container`` its container's directory too (nothing else can crash in that container)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            found = [(p, r) for p, r in catalog.iter_records(store) if match(r)]
            done = [(p, r) for p, r in found if r.get("status") != "collecting"]
            if done:
                path, rec = done[0]
                _verify(path, rec, what)
                return path, rec
            if time.monotonic() > deadline:
                state = "only a record still collecting" if found else "no record"
                raise SelftestError(f"the {what} crash left {state} in {store} after {timeout:.0f}s; "
                                    "see dmesg for corepipe errors")
            time.sleep(0.1)
    finally:
        _remove(store, [(p, r) for p, r in catalog.iter_records(store) if match(r)], throwaway_container)


def _remove(store: str, items: list, throwaway_container: bool) -> None:
    """Delete the selftest's crashes and the saved binaries only they referred to."""
    from corepipe.domain.books import Books
    from corepipe.platform.store import Store

    if not items:
        return
    with Store(store, create=False) as opened, Books(opened) as books:
        for path, _rec in items:
            books.delete_crash(*catalog.group_of(path, store))
    if throwaway_container:  # once the lock is let go: its ledger file for the container is gone by then
        for directory in {os.path.dirname(path) for path, _rec in items}:
            try:
                os.rmdir(directory)
            except OSError:
                pass


def _verify(path: str, rec: dict, what: str) -> None:
    core = rec.get("core") or {}
    if rec.get("status") != "complete" or not core.get("stored"):
        errors = "; ".join((rec.get("collector") or {}).get("errors") or []) or core.get("reason") or "no reason given"
        raise SelftestError(f"the {what} crash was recorded as {rec.get('status')!r} without a core: {errors}")
    head = bytearray()

    def keep_head(chunk: bytes) -> None:
        if not head:
            head.extend(chunk[:64])

    try:
        source = unpack.open_core(path, rec)
        try:
            unpack.copy(source, rec, keep_head)  # checks size and digest against the record
        finally:
            os.close(source)
    except unpack.CoreError as exc:
        raise SelftestError(f"the {what} core: {exc}") from None
    if not elf.is_core(bytes(head)):
        raise SelftestError(f"the {what} core in {path} is not an ELF core file")


def _core_line(rec: dict) -> str:
    core = rec["core"]
    return f"core {core['size']} bytes (zstd {core['compressed_size']}), {digest.stated(core)[0]} verified"
