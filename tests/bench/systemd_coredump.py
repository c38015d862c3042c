"""The benchmarks' systemd-coredump baseline: Debian's package, installed without changing the host's kernel
settings, its socket half started by hand, its storage configured to keep whole cores, and what it stored
checked (the file, and the size of the core inside it).

systemd-coredump is two processes. The kernel starts ``systemd-coredump`` with the pattern's arguments
(``process_kernel``): it reads the crashed process's metadata from ``/proc`` and sends it, with its stdin (the
kernel's pipe), over ``/run/systemd/coredump`` to a new instance of ``systemd-coredump@.service``
(``send_iovec``); it never collects inline unless the crashed process is PID 1 or journald, and with nobody
listening it logs "Failed to connect to coredump service" and the core is lost. The instance, started with the
connection as its only listening fd (``sd_listen_fds`` = 1: ``process_socket``), writes the core uncompressed to
an unnamed file in ``/var/lib/systemd/coredump``, compresses it into ``core.<comm>.<uid>.<boot>.<pid>.<time>``
with the build's compression, sets its metadata as ``user.coredump.*`` xattrs, fsyncs and links it, makes a
stack trace with elfutils and sends everything to the journal; the kernel lets the crashed process go when that
instance closes the pipe, at its end. PID 1 of these VMs is not systemd, so ``systemd-socket-activate
--seqpacket --accept`` plays the socket unit (``Accept=yes``: one instance per connection, the connection as fd
3), and the instance runs under the bench's rsswrap. Without journald the journal entry (with the stack trace)
is dropped ("Failed to log coredump"), so ``coredumpctl`` lists nothing: the stored file is all it leaves here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGE = "systemd-coredump"
BINARY = "/lib/systemd/systemd-coredump"
STORE = Path("/var/lib/systemd/coredump")
SOCKET = "/run/systemd/coredump"
#: The pattern and core_pipe_limit of the package's sysctl file (/usr/lib/sysctl.d/50-coredump.conf, 252.39).
PATTERN = f"|{BINARY} %P %u %g %s %t 9223372036854775808 %h %d"
PIPE_LIMIT = 16
#: The package's sysctl file sets core_pattern, core_pipe_limit and fs.suid_dumpable whenever it is applied (its
#: postinst; any later `sysctl --system`): masked in /etc before the package is installed, it never is.
SYSCTL_MASK = Path("/etc/sysctl.d/50-coredump.conf")
SUID_DUMPABLE = Path("/proc/sys/fs/suid_dumpable")
#: The bench's storage settings, as a drop-in under /run (gone at reboot; removed when the service stops):
#: systemd 252's defaults but for the size limits (2 GiB; the stack trace is skipped above ProcessSizeMax), raised
#: so that no core of the bench is cut or left without its stack trace.
CONFIG = Path("/run/systemd/coredump.conf.d/corepipe-bench.conf")
CONFIG_TEXT = ("[Coredump]\nStorage=external\nCompress=yes\nProcessSizeMax=32G\nExternalSizeMax=32G\n"
               "# Written by corepipe's tests/bench/systemd_coredump.py for its run; removed after it.\n")


def install() -> None:
    """Install the Debian package if it is missing: under the tests' lock, its sysctl file masked first, and
    core_pattern, core_pipe_limit and fs.suid_dumpable given back as they were, whatever the install did."""
    from support import KernelSettings  # tests/ is on the path once bench_collect is imported

    if os.path.exists(BINARY):
        return
    if not SYSCTL_MASK.is_symlink() and not SYSCTL_MASK.exists():
        SYSCTL_MASK.symlink_to("/dev/null")
    suid_dumpable = SUID_DUMPABLE.read_text().strip()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with KernelSettings() as settings:
        settings.undo_on_abort(["sysctl", "-q", f"fs.suid_dumpable={suid_dumpable}"])
        try:
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE], check=True,
                           env=env, stdout=subprocess.DEVNULL)
        finally:
            SUID_DUMPABLE.write_text(suid_dumpable)


def unavailable() -> Optional[str]:
    """None when the baseline can run here, else why not."""
    if not os.path.exists(BINARY) or not shutil.which("systemd-socket-activate"):
        return f"{PACKAGE} is not installed (run the bench with --install-systemd-coredump)"
    if listening(SOCKET):
        return f"another systemd-coredump is listening on {SOCKET}"
    return None


def listening(path: str) -> bool:
    """Whether something accepts connections on the AF_UNIX socket ``path`` (a stale file does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


class Service:
    """The socket half, started by hand on /run/systemd/coredump with the bench's storage settings; each
    instance runs under ``wrapper`` (rsswrap, which keeps LISTEN_PID right), and stopped by PID."""

    def __init__(self, wrapper: Path):
        if os.path.exists(SOCKET):
            os.unlink(SOCKET)  # stale: unavailable() checked that nothing listens
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG.write_text(CONFIG_TEXT)
        self.started = time.time()
        self.proc = subprocess.Popen(["systemd-socket-activate", "--seqpacket", "--accept", "--listen", SOCKET,
                                      str(wrapper), BINARY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(SOCKET):  # not connect(): an instance would start for it, and log a line
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("systemd-socket-activate did not listen on " + SOCKET)
            time.sleep(0.05)

    def stored(self) -> list:
        """(file size, size of the core inside it) of each core stored since the service started; deletes them.

        The core is decompressed to count it: a file cut by a size limit, or left half-written, shows."""
        found = []
        for path in sorted(STORE.glob("core.*")):
            if path.stat().st_mtime < self.started - 1:
                continue  # not the bench's
            found.append((path.stat().st_size, core_size(path)))
            path.unlink()
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if os.path.exists(SOCKET):
            os.unlink(SOCKET)
        CONFIG.unlink(missing_ok=True)


def core_size(path: Path) -> Optional[int]:
    """The uncompressed size of a stored core (None if it does not decompress whole). Debian builds
    systemd-coredump with zstd as its compression, which the bench's config turns on."""
    import zstandard

    if path.suffix != ".zst":
        return None
    size = 0
    try:
        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
    except zstandard.ZstdError:  # a broken or truncated file: what the check looks for
        return None
    return size
