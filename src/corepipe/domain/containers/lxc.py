"""LXC, LXD and Incus: ``lxc.payload.<name>`` (LXC 4+, LXD, Incus), ``lxc.payload/<name>`` and ``lxc/<name>`` (older).

``lxc.monitor.<name>`` holds LXC's monitor, a host process. The cgroup does not say which
manager made the container; its directory under the manager's lxcpath does. LXC keeps no init PID
on disk: the container's monitor holds it and answers ``LXC_CMD_GET_INIT_PID`` on its command
socket, the abstract unix socket ``@<lxcpath>/<name>/command`` (``lxc-info -p`` asks the same). Only
a root-owned socket counts (SO_PEERCRED): a user cannot stand in for a system container's monitor.
"""

from __future__ import annotations

import struct
from typing import Optional

from corepipe.domain.containers import state
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import NAME

RUNTIME = "lxc"
ENRICHES = (RUNTIME,)
#: Manager -> its lxcpath, where it keeps a container's directory (first match wins).
MANAGERS = (
    ("incus", "var/lib/incus/containers"),
    ("lxd", "var/snap/lxd/common/lxd/containers"),
    ("lxd", "var/lib/lxd/containers"),
    ("lxc", "var/lib/lxc"),
)
#: lxc/src/lxc/commands.h: the command, and the {int cmd/ret; u32 datalen; void *data} of a request and a
#: response (the init PID is the response's data).
GET_INIT_PID = 4
_MESSAGE = struct.Struct("iIP")
#: lxc_make_abstract_socket_name: a name that does not fit sun_path (108, less the leading and trailing NUL)
#: becomes lxc/<FNV-1a 64 of "<lxcpath>/<name>">/command.
_SUN_PATH = 108 - 2


def match(segments: list, root: str) -> Optional[tuple]:
    for i, seg in enumerate(segments):
        name = None
        if seg.startswith("lxc.payload."):
            name = seg[len("lxc.payload."):]
        elif seg in ("lxc.payload", "lxc") and i + 1 < len(segments):
            name, i = segments[i + 1], i + 1
        if name is not None:
            return (i, Container(runtime=RUNTIME, id=name, name=name)) if NAME.fullmatch(name) else None
    return None


def enrich(container: Container, deadline: state.Deadline, root: str) -> None:
    if not container.name or not NAME.fullmatch(container.name):
        return
    for manager, base in MANAGERS:
        directory = state.path(root, base, container.name)
        if state.exists(directory):
            container.details.update(manager=manager, directory="/" + state.path(base, container.name))
            container.details["init_pid"] = init_pid("/" + base, container.name, deadline)
            container.state_confirmed()
            return


def command_socket(lxcpath: str, name: str) -> bytes:
    """The abstract address of the monitor's command socket for container ``name`` under ``lxcpath``."""
    path = f"{lxcpath}/{name}/command"
    if len(path.encode()) >= _SUN_PATH:
        digest = 0xCBF29CE484222325
        for byte in f"{lxcpath}/{name}".encode():
            digest = ((digest ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        path = f"lxc/{digest:016x}/command"
    return b"\0" + path.encode()


def init_pid(lxcpath: str, name: str, deadline: state.Deadline) -> int:
    """The container's init PID as its monitor records it; raises (OSError, ValueError) when it cannot tell."""
    import socket  # only for an LXC container: the collect path does not pay for it otherwise

    from corepipe.platform import coredump_socket

    deadline.check()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(deadline.left())
        try:
            sock.connect(command_socket(lxcpath, name))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise ValueError(f"no monitor answers for {name} (not running): {exc.strerror}") from None
        _pid, uid, _gid = coredump_socket.peer_credentials(sock)
        if uid != 0:
            raise ValueError(f"the command socket of {name} belongs to uid {uid}, not root: not LXC's monitor")
        sock.sendall(_MESSAGE.pack(GET_INIT_PID, 0, 0))
        answer = b""
        while len(answer) < _MESSAGE.size:
            chunk = sock.recv(_MESSAGE.size - len(answer))
            if not chunk:
                raise ValueError(f"the monitor of {name} closed the command socket without an answer")
            answer += chunk
    ret, _length, pid = _MESSAGE.unpack(answer)
    pid = state.positive_int(pid)
    if ret != 0 or pid is None:
        raise ValueError(f"the monitor of {name} gave no init PID (ret {ret})")
    return pid
