"""The kernel's pattern while ``corepipe serve`` runs: the socket pattern written from the host's mount namespace,
and the guardian that puts the fallback (the pipe handler) back when the server dies."""

from __future__ import annotations

import os
import select
import signal
from typing import Optional

from corepipe.platform import coredump_socket, libc, procfs
from corepipe.platform.log import ERR, WARNING, log
from corepipe.platform.sysctl import CORE_PATTERN, Sysctl, SysctlError
from corepipe.services import collect, forwarded


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


def take(sysctl: Sysctl, socket_path: str, fallback: Optional[str], host_pid: int) -> tuple:
    """Point the kernel at the server's socket: (the pattern written, the fallback to put back on stop: the one
    given, else the pattern found unless it was a socket pattern). SysctlError when the kernel cannot."""
    modes = coredump_socket.core_modes(sysctl.root)
    if "socket" not in modes:
        raise SysctlError(f"this kernel has no coredump socket mode (kernel.core_modes: {' '.join(modes) or '-'}); "
                          "use 'corepipe install --mode pipe'")
    previous = sysctl.read(CORE_PATTERN)
    if fallback is None and not previous.startswith("@"):
        fallback = previous
    return set_socket_pattern(sysctl, socket_path, host_pid), fallback


def give_back(sysctl: Sysctl, pattern: Optional[str], fallback: Optional[str], host_pid: int, why: str) -> None:
    """The fallback pattern back, if the kernel still points at our socket (``pattern``); logged either way."""
    if pattern is None or fallback is None:
        return
    try:
        if sysctl.read(CORE_PATTERN) == pattern:
            write_pattern(sysctl, fallback, host_pid)
            log(f"serve: {why}; kernel.core_pattern set back to {fallback!r}", WARNING)
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
                   run_dir: str, config: Optional[str], host_pid: int) -> Optional[int]:
    """A child that outlives a killed server just long enough to put the fallback pattern back (when there is
    one) and to record the handed-over crashes it held that no worker had (forwarded.recover)."""
    parent = os.getpid()
    parent_fd = os.pidfd_open(parent)
    pid = os.fork()
    if pid != 0:
        os.close(parent_fd)
        return pid
    code = 0
    try:
        for listener in listeners:  # a dead server's sockets must refuse at once, not queue crashes nobody accepts
            listener.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGINT):  # systemd signals what is left once the server is gone
            signal.signal(signum, signal.SIG_IGN)
        select.select([parent_fd], [], [])
        if pattern is not None and fallback is not None and sysctl.read(CORE_PATTERN) == pattern:
            write_pattern(sysctl, fallback, host_pid)
            log(f"error: serve (pid {parent}) is gone; kernel.core_pattern set back to {fallback!r}", ERR)
        forwarded.recover(run_dir, collect.load_config(config, []), f"the server (pid {parent}) died")
    except BaseException as exc:  # noqa: BLE001
        log(f"error: serve guardian: {type(exc).__name__}: {exc}", ERR)
        code = 1
    finally:
        os._exit(code)
