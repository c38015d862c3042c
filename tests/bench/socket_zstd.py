"""The benchmark's socket-mode baseline: the zstd CLI reading the kernel's coredump socket.

    socket_zstd.py SOCKET WRAPPER HANDLER

Listens on SOCKET (``core_pattern = @@SOCKET``), answers each kernel request with KERNEL (+ WAIT),
and runs ``WRAPPER HANDLER <pid>`` (rsswrap.c and the bench's zstd script) with the connection as its
stdin, as the kernel runs a pipe handler with the pipe. So the same program, measured the same way,
runs on either transport, and the benchmark shows what the socket itself costs. Creates
``SOCKET.ready`` once it listens; stopped by SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from corepipe.platform import coredump_socket  # noqa: E402


def main() -> int:
    path, wrapper, handler = sys.argv[1:4]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the wrappers are reaped by the kernel
    listener = coredump_socket.listen(path, 4096)
    Path(path + ".ready").touch()
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                request = coredump_socket.read_request(conn)
                coredump_socket.send_ack(conn, coredump_socket.choose(request, coredump_socket.KERNEL))
            except (coredump_socket.ProtocolError, OSError) as exc:
                print(f"socket_zstd: {exc}", file=sys.stderr)
                continue
            pid, _uid, _gid = struct.unpack("=iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            os.posix_spawn(wrapper, [wrapper, handler, str(pid)], {},
                           file_actions=[(os.POSIX_SPAWN_DUP2, conn.fileno(), 0)],
                           setsigdef=[signal.SIGCHLD])  # the wrapper waits for its handler


if __name__ == "__main__":
    raise SystemExit(main())
