"""The kernel's pattern while ``corepipe serve`` runs: the socket pattern written from the host's mount namespace,
noted with its fallback in ``<run_dir>/pattern.json`` (health.py), and the guardian that puts the fallback (the
pipe handler) back when the server dies.

The guardian is double-forked into a session of its own, so a SIGKILL of the server's process group (an OOM kill
of the group, a shell's job control) does not take it along; it watches the server through a pidfd. Should it die
too (a pod's force-delete kills every process in it), the note stays: the next server puts that fallback back on
its stop, and ``status`` reports the socket pattern without a listener as broken."""

from __future__ import annotations

import os
import select
import signal
from typing import Optional

from corepipe.platform import coredump_socket, libc, procfs
from corepipe.platform.log import ERR, WARNING, log
from corepipe.platform.sysctl import CORE_PATTERN, Sysctl, SysctlError
from corepipe.services import collect, forwarded
from corepipe.services.serve import health


def write_pattern(sysctl: Sysctl, value: str, host_pid: int = 1) -> None:
    """kernel.core_pattern = ``value``, written from the host's mount namespace (``host_pid``'s, the node's
    init by default): the kernel takes a socket pattern only from there (EIO from any other), and a server
    in a pod (hostPID) or in systemd's sandbox has mounts of its own. A forked child joins the host's mounts
    for the write (setns needs a single thread); the value is read back here."""
    try:
        same = procfs.namespace(host_pid, "mnt") == procfs.namespace("self", "mnt")
    except OSError:
        same = True  # not ours to join (or no such process): write from here, the read-back tells
    if same:
        sysctl.write(CORE_PATTERN, value)
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            libc.setns(procfs.open_namespace(host_pid, "mnt"), libc.CLONE_NEWNS)
            sysctl.write(CORE_PATTERN, value)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent reads the value back and reports
            pass
        finally:
            os._exit(code)
    os.waitpid(pid, 0)
    kept = sysctl.read(CORE_PATTERN)
    if kept != value:
        raise SysctlError(f"kernel.core_pattern = {value!r} could not be written from the mount namespace of pid "
                          f"{host_pid} (it is {kept!r}); run the server with the host's PID namespace (hostPID)")


def take(sysctl: Sysctl, socket_path: str, fallback: Optional[str], host_pid: int, run_dir: str) -> tuple:
    """Point the kernel at the server's socket and note it: (the pattern written, the fallback to put back on
    stop: the one given, else the pattern found unless it was a socket pattern, else the fallback a previous
    server noted for the socket pattern found). SysctlError when the kernel cannot."""
    modes = coredump_socket.core_modes(sysctl.root)
    if "socket" not in modes:
        raise SysctlError(f"this kernel has no coredump socket mode (kernel.core_modes: {' '.join(modes) or '-'}); "
                          "use 'corepipe install --mode pipe'")
    previous = sysctl.read(CORE_PATTERN)
    owned = health.read_owned(run_dir)
    if fallback is None and not previous.startswith("@"):
        fallback = previous
    elif fallback is None and owned is not None and owned["pattern"] == previous:
        fallback = owned["fallback"]  # a server killed with its guardian left the kernel on our socket
        log(f"serve: kernel.core_pattern {previous!r} was left by a server that died; on stop: {fallback!r}",
            WARNING)
    pattern = set_socket_pattern(sysctl, socket_path, host_pid)
    try:
        health.write_owned(run_dir, pattern, fallback)
    except OSError as exc:
        log(f"error: serve: cannot note the fallback pattern in {run_dir} (a server killed with its guardian "
            f"leaves the kernel on the socket): {exc}", ERR)
    return pattern, fallback


def give_back(sysctl: Sysctl, pattern: Optional[str], fallback: Optional[str], host_pid: int, why: str,
              run_dir: str) -> None:
    """The fallback pattern back, if the kernel still points at our socket (``pattern``), and the note gone once
    the kernel no longer does; logged either way."""
    if pattern is None:
        return
    try:
        if fallback is not None and sysctl.read(CORE_PATTERN) == pattern:
            write_pattern(sysctl, fallback, host_pid)
            log(f"serve: {why}; kernel.core_pattern set back to {fallback!r}", WARNING)
        if sysctl.read(CORE_PATTERN) != pattern:
            health.forget_owned(run_dir)
    except SysctlError as exc:
        log(f"error: serve: {why}; cannot put back kernel.core_pattern: {exc}", ERR)


def set_socket_pattern(sysctl: Sysctl, path: str, host_pid: int) -> str:
    """``@@path`` where the kernel takes it (6.17), else ``@path``; read back either way."""
    for ack in (True, False):
        value = coredump_socket.pattern(path, ack=ack)
        try:
            write_pattern(sysctl, value, host_pid)
            return value
        except SysctlError:
            continue
    raise SysctlError(f"the kernel took neither @@{path} nor @{path} as kernel.core_pattern")


def start_guardian(sysctl: Sysctl, pattern: Optional[str], fallback: Optional[str], listeners: list, *,
                   run_dir: str, config: Optional[str], host_pid: int) -> tuple:
    """A process outside the server's process group and session that outlives a killed server just long enough
    to put the fallback pattern back (when there is one) and to record the handed-over crashes it held that no
    worker had (forwarded.recover): (its pid, a pidfd of it: not the server's child, the server stops it with
    ``stop_guardian``), or (None, None)."""
    parent = os.getpid()
    parent_fd = os.pidfd_open(parent)
    told_r, told_w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle != 0:
        os.close(parent_fd)
        os.close(told_w)
        os.waitpid(middle, 0)
        with os.fdopen(told_r, "rb") as told:
            answer = told.read(32)
        try:
            return int(answer), os.pidfd_open(int(answer))
        except (ValueError, OSError) as exc:
            log(f"error: serve: no guardian ({exc}): a killed server leaves the kernel on its socket", ERR)
            return None, None
    try:
        os.close(told_r)
        os.setsid()
        pid = os.fork()
        if pid != 0:
            os.write(told_w, str(pid).encode())
            os._exit(0)
        os.close(told_w)
    except BaseException:  # noqa: BLE001 - the server reads no pid and says so
        os._exit(1)
    _guard(sysctl, pattern, fallback, listeners, parent, parent_fd, run_dir, config, host_pid)


def stop_guardian(pidfd: int) -> None:
    """SIGKILL the guardian and wait until it is gone (it is not the server's child: its pidfd tells)."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 10)
    except OSError:
        pass
    os.close(pidfd)


def _guard(sysctl: Sysctl, pattern: Optional[str], fallback: Optional[str], listeners: list, parent: int,
           parent_fd: int, run_dir: str, config: Optional[str], host_pid: int) -> None:
    code = 0
    try:
        for listener in listeners:  # a dead server's sockets must refuse at once, not queue crashes nobody accepts
            listener.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # systemd signals what is left of the unit
            signal.signal(signum, signal.SIG_IGN)
        select.select([parent_fd], [], [])
        give_back(sysctl, pattern, fallback, host_pid, f"the server (pid {parent}) is gone", run_dir)
        forwarded.recover(run_dir, collect.load_config(config, []), f"the server (pid {parent}) died")
    except BaseException as exc:  # noqa: BLE001
        log(f"error: serve guardian: {type(exc).__name__}: {exc}", ERR)
        code = 1
    finally:
        os._exit(code)
