"""The kernel's coredump socket (``core_pattern = @/path`` since Linux 6.16, ``@@/path`` since 6.17).

With ``@`` the kernel connects to an AF_UNIX stream listener and writes the core, then shuts its side
down. With ``@@`` it first sends a ``struct coredump_req`` (include/uapi/linux/coredump.h) and waits
for a ``struct coredump_ack`` naming exactly one of KERNEL / USERSPACE / REJECT (plus WAIT, which keeps
the crashed task until we close), then answers with a 4-byte marker: 0 when the ack was taken, else
why not (and no core follows). The peer of the connection is the crashing process: SO_PEERPIDFD gives
a pidfd of it and PIDFD_GET_INFO its ids and whether it is really dumping core (a local process could
connect to the socket too). ``kernel_args`` builds from the peer what the kernel's arguments
would have told a pipe handler, so both entry points feed one pipeline (services/collect.py).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from corepipe.platform import procfs
from corepipe.platform.kernel import RLIM_INFINITY, KernelArgs
from corepipe.platform.sysctl import Sysctl, SysctlError

#: Where ``corepipe serve`` listens for the kernel by default (``install --mode socket`` points the pattern here).
DEFAULT_SOCKET = "/run/corepipe/coredump.socket"
#: coredump_req / coredump_ack flag bits.
KERNEL, USERSPACE, REJECT, WAIT = 1, 2, 4, 8
#: The first published sizes of both structs (COREDUMP_{REQ,ACK}_SIZE_VER0).
REQ_SIZE_VER0 = ACK_SIZE_VER0 = 16
#: A request bigger than a page is not a kernel's (the selftests refuse it too).
REQ_SIZE_MAX = 4096
#: enum coredump_mark: the kernel's answer to our ack.
MARKS = {0: "accepted", 1: "ack too small", 2: "ack too big", 3: "unsupported flag", 4: "conflicting flags"}
MARK_SIZE = 4
_REQ = struct.Struct("=IIQ")
_ACK = struct.Struct("=IIQ")

#: getsockopt(SOL_SOCKET, SO_PEERPIDFD) (Linux 6.5; asm-generic value, x86 and arm64 alike).
SO_PEERPIDFD = 77
#: struct pidfd_info: mask, cgroupid, pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid,
#: exit_code, coredump_mask, coredump_signal, supported_mask. The kernel copies as much as both know.
_PIDFD_INFO = struct.Struct("=QQIIIIIIIIIIIiIIQ")
PIDFD_INFO_PID, PIDFD_INFO_CREDS, PIDFD_INFO_CGROUPID, PIDFD_INFO_EXIT = 1, 2, 4, 8
PIDFD_INFO_COREDUMP = 1 << 4
PIDFD_INFO_COREDUMP_SIGNAL = 1 << 6
#: coredump_mask bits.
PIDFD_COREDUMPED, PIDFD_COREDUMP_SKIP, PIDFD_COREDUMP_USER, PIDFD_COREDUMP_ROOT = 1, 2, 4, 8


def _iowr(kind: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | number


PIDFD_GET_INFO = _iowr(0xFF, 11, _PIDFD_INFO.size)


class ProtocolError(Exception):
    """The peer did not follow the coredump socket protocol (or went away)."""


@dataclass
class Request:
    size: int
    size_ack: int
    mask: int


def parse_request(data: bytes) -> Request:
    """A coredump_req from its first ``REQ_SIZE_VER0`` bytes (a newer kernel's tail is not ours to read)."""
    if len(data) < REQ_SIZE_VER0:
        raise ProtocolError(f"coredump request of {len(data)} bytes, expected at least {REQ_SIZE_VER0}")
    return Request(*_REQ.unpack_from(data))


def pack_ack(mask: int) -> bytes:
    return _ACK.pack(ACK_SIZE_VER0, 0, mask)


def _recv_exact(sock: socket.socket, size: int, flags: int = 0) -> bytes:
    data = sock.recv(size, flags | socket.MSG_WAITALL)
    if len(data) != size:
        raise ProtocolError(f"the connection ended after {len(data)} of {size} bytes")
    return data


def read_request(sock: socket.socket) -> Request:
    """The kernel's request, reading its whole announced ``size`` (tolerating a bigger, newer one)."""
    size, = struct.unpack("=I", _recv_exact(sock, 4, socket.MSG_PEEK))
    if not REQ_SIZE_VER0 <= size <= REQ_SIZE_MAX:
        raise ProtocolError(f"coredump request announces {size} bytes")
    request = parse_request(_recv_exact(sock, size))
    if request.size_ack < ACK_SIZE_VER0:
        raise ProtocolError(f"the kernel takes an ack of {request.size_ack} bytes, less than ours")
    return request


def choose(request: Request, want: int) -> int:
    """The ack mask for ``want`` (KERNEL or REJECT), with WAIT when offered; ProtocolError if not offered."""
    if not request.mask & want:
        raise ProtocolError(f"the kernel does not offer {want:#x} (offered {request.mask:#x})")
    return want | (request.mask & WAIT if want == KERNEL else 0)


def send_ack(sock: socket.socket, mask: int) -> None:
    """Send the ack and read the kernel's marker; ProtocolError unless it was taken."""
    sock.sendall(pack_ack(mask))
    mark, = struct.unpack("=I", _recv_exact(sock, MARK_SIZE))
    if mark != 0:
        raise ProtocolError(f"the kernel refused the ack {mask:#x}: {MARKS.get(mark, f'marker {mark}')}")


#: struct ucred (SO_PEERCRED): pid, uid, gid.
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def peer_pidfd(sock: socket.socket) -> int:
    """A pidfd of the connecting (crashing) process, owned by the caller."""
    return struct.unpack("=i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]


@dataclass
class PidfdInfo:
    mask: int
    cgroupid: int
    pid: int
    tgid: int
    ppid: int
    ruid: int
    rgid: int
    euid: int
    egid: int
    coredump_mask: int
    #: The fatal signal, where the kernel tells it (PIDFD_INFO_COREDUMP_SIGNAL); else None.
    signal: Optional[int]

    @property
    def dumping(self) -> bool:
        """The process is dumping core: only then did the kernel, not a local process, connect."""
        return bool(self.mask & PIDFD_INFO_COREDUMP and self.coredump_mask & PIDFD_COREDUMPED)


def parse_pidfd_info(data: bytes) -> PidfdInfo:
    fields = _PIDFD_INFO.unpack(data.ljust(_PIDFD_INFO.size, b"\0")[:_PIDFD_INFO.size])
    mask = fields[0]
    return PidfdInfo(mask=mask, cgroupid=fields[1], pid=fields[2], tgid=fields[3], ppid=fields[4],
                     ruid=fields[5], rgid=fields[6], euid=fields[7], egid=fields[8], coredump_mask=fields[14],
                     signal=fields[15] if mask & PIDFD_INFO_COREDUMP_SIGNAL else None)


def pidfd_info(pidfd: int) -> PidfdInfo:
    """PIDFD_GET_INFO with the coredump fields asked for; OSError if the kernel has no such ioctl."""
    request = _PIDFD_INFO.pack(PIDFD_INFO_PID | PIDFD_INFO_CREDS | PIDFD_INFO_CGROUPID | PIDFD_INFO_COREDUMP
                               | PIDFD_INFO_COREDUMP_SIGNAL, *([0] * 16))
    return parse_pidfd_info(fcntl.ioctl(pidfd, PIDFD_GET_INFO, request))


def pidfd_exit(pidfd: int) -> Optional[int]:
    """The process's wait status once it has exited (PIDFD_INFO_EXIT), else None."""
    request = _PIDFD_INFO.pack(PIDFD_INFO_EXIT, *([0] * 16))
    mask, *fields = _PIDFD_INFO.unpack(fcntl.ioctl(pidfd, PIDFD_GET_INFO, request))
    return fields[12] if mask & PIDFD_INFO_EXIT else None


def core_modes(proc_sys: str = "/proc/sys") -> set:
    """What ``kernel.core_modes`` lists (``file``, ``pipe``, ``socket``...); empty on kernels without it."""
    try:
        return set(Sysctl(proc_sys).read("kernel.core_modes").split())
    except SysctlError:  # a kernel before 6.16 has no such file
        return set()


def pattern(path: str, ack: bool = True) -> str:
    """The core_pattern for a socket at ``path`` (absolute, resolved from the host's root)."""
    if not os.path.isabs(path) or any(c.isspace() for c in path):
        raise ValueError(f"the socket path {path!r} must be absolute and without white space")
    return ("@@" if ack else "@") + path


#: The first fd systemd passes (sd_listen_fds).
SD_LISTEN_FDS_START = 3


def activated_sockets() -> dict:
    """The listening sockets systemd passed (LISTEN_FDS: corepipe.socket's stream socket for the kernel,
    corepipe-forward.socket's seqpacket one for the handlers), by type; empty without socket activation."""
    count = os.environ.get("LISTEN_FDS", "")
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or count not in ("1", "2"):
        return {}
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    found = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        found[sock.type] = sock
    return found


#: In /proc/net/unix's Flags: __SO_ACCEPTCON, a listening socket.
_ACCEPTCON = 0x10000


def has_listener(path: str, net_unix: str = "/proc/net/unix") -> Optional[bool]:
    """Whether a socket listens at ``path`` (in this network namespace), from /proc/net/unix without connecting
    (a connection to the coredump socket would look like a crash to its server); None when that cannot be read."""
    try:
        with open(net_unix, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == path:
            try:
                if int(fields[3], 16) & _ACCEPTCON:
                    return True
            except ValueError:
                continue
    return False


def listen(path: str, backlog: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A fresh listening socket at ``path`` (root only: mode 0600), replacing a stale one: the kernel's coredump
    socket (a stream), or with ``kind`` SOCK_SEQPACKET the handlers' (platform/forward.py)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def kernel_args(info: PidfdInfo, proc: Optional[procfs.Proc], *, when: int, hostname: Optional[str],
                config: Optional[str]) -> KernelArgs:
    """What the kernel's ``%P %p %I %u %g %t %c %d %F %h %e`` would have told a pipe handler, from the peer's
    pidfd and what capture read of /proc (the signal comes later, from the core or the exit status)."""
    files = proc.files if proc is not None else {}
    nspid = proc.status().get("NSpid", "").split() if proc is not None else []
    comm = files.get("comm", b"").decode("utf-8", "replace").rstrip("\n")
    return KernelArgs(pid=info.pid, ns_pid=int(nspid[-1]) if nspid and nspid[-1].isdigit() else None,
                      tid=procfs.dumping_thread(info.pid), uid=info.ruid, gid=info.rgid, time=when,
                      core_limit=procfs.core_limit(files.get("limits", b""), RLIM_INFINITY),
                      dump_mode=2 if info.coredump_mask & PIDFD_COREDUMP_ROOT else 1,
                      pidfd=proc.pidfd if proc is not None else None, hostname=hostname, comm=comm or None,
                      config=config)
