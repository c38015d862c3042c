"""The handler's first moments: everything that needs the crashed process, with nothing but ``os`` loaded.

The kernel keeps the crashed process (and its container's restart) until the handler closes
the pipe, and for a small core the handler's own start-up is most of that wait: the standard
library the rest of ``collect`` uses takes ~20 ms to import. So ``take`` runs first, before any
other corepipe module is imported: it parses the host PID and pidfd from the kernel's arguments,
reads the raw ``/proc/<pid>`` files (the trust checks on them run later, in snapshot.py, on the
same bytes), opens the executable and mapped files that binaries.py and backtrace.py use later,
and reads the start of the core into memory. When the whole core fitted (``CORE_PREFIX``), the
pipe is let go at once and the kernel reaps the process; the config, the container, the storage
policy and the record are all decided afterwards, on what was captured here. Not so for a process
in a mount namespace of its own (a container): its runtime's state (runc's state.json, Docker's
config of a ``--rm`` container) can vanish with it, so collector.py lets go only once the container
is identified. A bigger core is read on from the pipe by compress.py as before.

A file served by a user-space or network filesystem (FUSE, NFS, CIFS, 9p, ...) can block an open
or a read for as long as its server likes, and neither SIGALRM nor any other catchable signal
ends that wait; only SIGKILL does. So mapped files are opened only on filesystems the kernel
serves from local storage (``LOCAL_FILESYSTEMS``, decided from the mapping's device in ``maps``
and the mount tables: the process's own and the handler's); the others are listed in
``hold_errors`` and never touched. And the /proc files the kernel reads out of the crashed
process's memory (``MEMORY_FILES``: its argv and environment can point into a FUSE-backed
mapping) are read by a forked child that is SIGKILLed at ``MEMORY_SECONDS`` (``read_in_child``).

Only ``os``, ``time``, ``_signal`` (the builtin behind ``signal``, without its ``enum``), and the
small C modules ``fcntl``, ``select`` and ``mmap`` may be imported here (tests/unit/test_launcher.py checks
what is loaded when the pipe is let go). Annotations are strings (``from __future__``), so the
``X | None`` spelling costs no ``typing`` import. Nothing here raises: what fails is listed in ``errors``.
"""

from __future__ import annotations

import _signal
import os
import stat  # loaded by os already
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

STDIN = 0
#: The kernel's arguments after ``collect [--config PATH]``: kernel.FIELDS, where pid and pidfd sit
#: (kernel.py checks these against FIELDS when it is imported).
CONFIG_OPTION = "--config"
ARG_COUNT = 12
PID_AT = 0
PIDFD_AT = 9
#: The /proc/<pid> files read (each at most PROC_LIMIT bytes: the config, with its proc_read_limit,
#: is read only later) and the links.
PROC_FILES = ("comm", "cmdline", "status", "limits", "cgroup", "maps", "mountinfo", "environ", "stat")
#: Those of PROC_FILES that the kernel reads from the process's memory (they can fault in a FUSE page).
MEMORY_FILES = ("cmdline", "environ")
MEMORY_SECONDS = 5
#: Filesystems whose files may be opened and read in the handler: served by the kernel from local storage,
#: so no server can stall an open or a read.
LOCAL_FILESYSTEMS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "squashfs", "erofs",
                               "vfat", "exfat", "f2fs", "iso9660", "ramfs", "devtmpfs", "jfs", "reiserfs",
                               "nilfs2", "hugetlbfs", "bcachefs", "udf", "ntfs3", "zfs", "shm"))
PROC_LINKS = ("exe", "cwd", "root")
PROC_LIMIT = 1 << 20
#: Mapped files held open at most.
MAX_FILES = 1024
#: Bytes of the core read before the pipe may be let go; a bigger core is streamed from the pipe.
CORE_PREFIX = 4 << 20
#: Bounds on this stage (the config's ``timeout`` is not known yet). A hostile process can stall a
#: /proc read or open (a FUSE-backed mapping) or its own dump: what was done by then is kept, the
#: rest of the collection goes on under the config's timeout.
PROC_SECONDS = 10
CORE_SECONDS = 10
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_HEX = frozenset("0123456789abcdef")


class Timeout(Exception):
    """A time limit of the handler ran out (raised from SIGALRM)."""


def on_alarm(signum: int, frame: object) -> None:
    raise Timeout("the handler's time limit ran out")


class Proc:
    """The raw reads of /proc/<pid>, in the order snapshot.py's checks rely on: the pidfd's owner,
    the files and links, then ``stat`` and the pidfd's owner again."""

    def __init__(self, pid: int, pidfd: int | None):
        self.pid, self.pidfd = pid, pidfd
        self.owner: int | None = None
        self.owner_after: int | None = None
        self.files: dict = {}
        self.links: dict = {}
        self.stat_again: bytes | None = None
        #: Its mount namespace (``ns/mnt``), to tell a process of the host's from a container's.
        self.mnt_ns: str | None = None
        #: Its PID namespace (``ns/pid``) and an fd held on it: containers.belongs compares it with the
        #: container init's, and walks its parents, even after the process is reaped or its PID reused.
        self.pid_ns: str | None = None
        self.pid_ns_fd: int | None = None
        self.errors: list = []
        #: False when the process was gone (or /proc unreadable) before anything was read.
        self.opened = False
        #: True when PROC_SECONDS ran out before every read was done.
        self.timed_out = False


class Capture:
    """What ``take`` got: the process's /proc data, its files held open, and the start of the core."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        #: When the collector took the crash (wall clock, sub-second): orders the crashes of one ``%t`` second.
        self.received = time.time()
        self.proc: Proc | None = None
        #: (path, fd, is the executable) of each file held open, and why others could not be.
        self.held: list = []
        self.hold_errors: list = []
        #: The first bytes of the core; ``eof`` when they are all of it (the pipe then may be let go).
        self.core: memoryview = memoryview(b"")
        self.eof = False
        self.released = False
        #: The process has a mount namespace of its own (or it is not known): the pipe is kept until
        #: the container is identified.
        self.own_mounts = False
        self.errors: list = []


def is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 20


def kernel_ids(argv: list) -> tuple:
    """(host PID, pidfd) from ``[--config PATH] <specifiers>``, by kernel.parse_args' rules; None where unusable."""
    rest = argv[2:] if len(argv) >= 2 and argv[0] == CONFIG_OPTION else argv
    if not rest or not is_number(rest[PID_AT]):
        return None, None
    pidfd = rest[PIDFD_AT] if len(rest) == ARG_COUNT else ""
    return int(rest[PID_AT]), int(pidfd) if is_number(pidfd) else None


def read_fd(fd: int, limit: int, check: Callable[[], None] | None = None) -> bytes:
    """At most ``limit`` bytes from ``fd``; ``check`` runs before each read (a deadline may raise)."""
    chunks, size = [], 0
    while size < limit:
        if check is not None:
            check()
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read(dir_fd: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def read_in_child(dir_fd: int, names: tuple, limit: int, seconds: float) -> tuple:
    """({name: bytes}, {name: error}) of files below ``dir_fd``, read by a forked child that is SIGKILLed after
    ``seconds``: a read that blocks where no signal but SIGKILL ends the wait (a FUSE page) cannot hold the
    handler. A file not read in time has the error "timed out"."""
    reader = MemoryReader()
    try:
        return reader.read(dir_fd, names, limit, seconds)
    finally:
        reader.close()


class MemoryReader:
    """The child of ``read_in_child``, forked when this is made: a socket server's idle worker makes one ahead
    of its crash, so the fork (~1.7 ms here) is not between the kernel's connection and its ack.

    It is told the directory as an fd number of its parent and opens it through ``/proc/<parent>/fd``: the
    same directory, with no fd passing (which would need ``socket``). It keeps no other fd of its parent's
    (not the kernel's pipe either), and exits without reading if the parent closes its request pipe. It
    closes its output before it exits, so the read ends without waiting for its exit (unmapping its copy of
    the parent's memory took ~1 ms of the 1.4): ``close`` reaps it, after the crash's urgent part."""

    def __init__(self) -> None:
        request_read, self._request = os.pipe()
        self._output, output_write = os.pipe()
        parent = os.getpid()
        self._pid = os.fork()
        if self._pid == 0:
            code = 0
            try:
                low, high = sorted((request_read, output_write))
                os.closerange(0, low)
                os.closerange(low + 1, high)
                os.closerange(high + 1, 1 << 20)
                _serve_request(parent, request_read, output_write)
            except BaseException:  # noqa: BLE001 - a child must never return into the handler
                code = 1
            finally:
                os._exit(code)
        os.close(request_read)
        os.close(output_write)
        self._used = self._waited = False

    def read(self, dir_fd: int, names: tuple, limit: int, seconds: float) -> tuple:
        """``read_in_child``'s result; a reader reads once (a second read forks a new one)."""
        if self._used:
            return read_in_child(dir_fd, names, limit, seconds)
        self._used = True  # from here on the request and output fds are closed whatever happens
        import select

        chunks, deadline, done = [], time.monotonic() + seconds, False
        try:
            try:
                os.write(self._request, b"%d %d %s\n" % (dir_fd, limit, " ".join(names).encode()))
            finally:
                os.close(self._request)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._output], [], [], left)[0]:
                    break
                chunk = os.read(self._output, 1 << 20)
                if not chunk:
                    done = True  # the child closed its end: it is exiting
                    break
                chunks.append(chunk)
        finally:
            os.close(self._output)
            if not done:
                # SIGKILL ends a wait that SIGALRM cannot; but a FUSE request the server has already taken is
                # waited out even then, so the child is not waited for: init reaps it when the server answers.
                os.kill(self._pid, 9)
                os.waitpid(self._pid, os.WNOHANG)
                self._waited = True
        return _parse_child_output(b"".join(chunks), names)

    def close(self) -> None:
        """Reap the child; an unused one is let go first (it sees its request pipe closed and exits)."""
        if not self._used:
            self._used = True
            os.close(self._request)
            os.close(self._output)
        if not self._waited:
            self._waited = True
            os.waitpid(self._pid, 0)


def _serve_request(parent: int, request: int, output: int) -> None:
    """The reader child's work: "<fd> <limit> <names>" in, "<name> <length or -errno>\n<bytes>" out for each."""
    line = read_fd(request, 4096)
    if not line:
        return
    fd, limit, *names = line.split()
    dir_fd = os.open(f"/proc/{parent}/fd/{int(fd)}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in names:
        try:
            data, head = b"", b""
            data = _read(dir_fd, name.decode(), int(limit))
            head = b"%s %d\n" % (name, len(data))
        except OSError as exc:
            head = b"%s -%d\n" % (name, exc.errno or 0)
        view = memoryview(head + data)
        while view:
            view = view[os.write(output, view):]
    os.close(output)


def _parse_child_output(data: bytes, names: tuple) -> tuple:
    files, errors = {}, {}
    pos = 0
    while pos < len(data):
        line_end = data.find(b"\n", pos)
        if line_end < 0:
            break
        name, _, size = data[pos:line_end].decode("ascii", "replace").partition(" ")
        pos = line_end + 1
        if size.startswith("-"):
            errors[name] = os.strerror(int(size[1:] or 0))
            continue
        if pos + int(size) > len(data):
            break
        files[name] = data[pos:pos + int(size)]
        pos += int(size)
    for name in names:
        if name not in files and name not in errors:
            errors[name] = f"timed out (more than {MEMORY_SECONDS} s: a blocking filesystem?)"
    return files, errors


def stat_field(stat: bytes, number: int) -> int | None:
    """Field ``number`` (1-based) of /proc/<pid>/stat, from 3 on; the comm in field 2 may hold spaces and ')'
    so split after the last ')'."""
    _, sep, rest = stat.rpartition(b")")
    fields = rest.split()
    if not sep or len(fields) < number - 2:
        return None
    try:
        return int(fields[number - 3])
    except ValueError:
        return None


def pidfd_pid(pidfd: int) -> int | None:
    """The PID a pidfd refers to, from its fdinfo: -1 once the process is gone, None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f.read(4096).splitlines():
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_proc(proc: Proc, limit: int = PROC_LIMIT, hold: bool = False, out: Capture | None = None,
              reader: MemoryReader | None = None) -> None:
    """Fill ``proc``; with ``hold``, also open the exe and mapped files into ``out`` before /proc/<pid> is closed.
    ``reader``, forked ahead, reads MEMORY_FILES (else ``read_in_child`` forks one now)."""
    if proc.pidfd is not None:
        proc.owner = pidfd_pid(proc.pidfd)
    try:
        dir_fd = os.open(f"/proc/{proc.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        proc.errors.append(f"/proc/{proc.pid}: {exc.strerror}")
        return
    proc.opened = True
    try:
        for name in PROC_FILES:
            if name in MEMORY_FILES:
                continue
            try:
                proc.files[name] = _read(dir_fd, name, limit)
            except OSError as exc:
                proc.errors.append(f"{name}: {exc.strerror}")
        if reader is None:
            memory, failed = read_in_child(dir_fd, MEMORY_FILES, limit, MEMORY_SECONDS)
        else:
            memory, failed = reader.read(dir_fd, MEMORY_FILES, limit, MEMORY_SECONDS)
        proc.files.update(memory)
        proc.errors += [f"{name}: {error}" for name, error in failed.items()]
        for name in PROC_LINKS:
            try:
                proc.links[name] = os.readlink(name, dir_fd=dir_fd)
            except OSError as exc:
                proc.errors.append(f"{name}: {exc.strerror}")
        try:
            proc.mnt_ns = os.readlink("ns/mnt", dir_fd=dir_fd)
        except OSError as exc:
            proc.errors.append(f"ns/mnt: {exc.strerror}")
        try:
            proc.pid_ns = os.readlink("ns/pid", dir_fd=dir_fd)
            proc.pid_ns_fd = os.open("ns/pid", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            proc.errors.append(f"ns/pid: {exc.strerror}")
        try:
            proc.stat_again = _read(dir_fd, "stat", 4096)
        except OSError:
            pass
        if proc.pidfd is not None:
            proc.owner_after = pidfd_pid(proc.pidfd)
        if hold and out is not None:
            maps = proc.files.get("maps", b"").decode("utf-8", "replace")
            local = local_devices(proc.files.get("mountinfo", b""))
            open_mapped(dir_fd, maps, proc.links.get("exe"), out.held, out.hold_errors, local)
    finally:
        os.close(dir_fd)


def local_devices(mountinfo: bytes) -> dict:
    """{"major:minor": is a LOCAL_FILESYSTEMS type} from the process's mount table and the handler's own
    (overlayfs maps show the device of the layer below, often in the host's table only)."""
    result: dict = {}
    tables = [mountinfo]
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            tables.append(f.read(PROC_LIMIT))
    except OSError:
        pass
    for table in tables:
        for line in table.decode("utf-8", "replace").splitlines():
            fields = line.split()
            if " - " not in line or len(fields) < 3:
                continue
            fstype = line.split(" - ", 1)[1].split(" ", 1)[0]
            device = fields[2]
            result[device] = result.get(device, True) and fstype in LOCAL_FILESYSTEMS
    return result


def mapped_files(maps: str) -> list:
    """(address range as map_files names it, path, device "major:minor") of each distinct file-backed mapping in a
    /proc/<pid>/maps text (maps print the device in hex; mountinfo in decimal: this is the decimal form)."""
    seen, result = set(), []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/") or not _is_range(parts[0]):
            continue
        key = (parts[3], parts[4])
        if key not in seen:
            seen.add(key)
            start, _, end = parts[0].partition("-")
            # maps pads addresses to 8 digits, map_files names them without: 00400000 (a static executable's
            # first mapping) is map_files/400000-...
            result.append((f"{int(start, 16):x}-{int(end, 16):x}", parts[5], _decimal_device(parts[3])))
    return result


def _decimal_device(text: str) -> str:
    major, _, minor = text.partition(":")
    try:
        return f"{int(major, 16)}:{int(minor, 16)}"
    except ValueError:
        return "?"


def _is_range(text: str) -> bool:
    start, sep, end = text.partition("-")
    return bool(sep) and all(0 < len(x) <= 16 and _HEX.issuperset(x) for x in (start, end))


def open_mapped(dir_fd: int, maps: str, exe: str | None, held: list, errors: list, local: dict) -> None:
    """Open the exe and each mapped regular file relative to a /proc/<pid> directory fd, adding
    ``[path, fd, is_exe]`` to ``held`` (as it goes: a timeout keeps what was opened) and failures to
    ``errors``. Only files on a device that ``local`` (local_devices) says is a local filesystem are
    opened. The fds keep the files reachable after the process is gone."""
    mappings = mapped_files(maps)
    exe_device = next((device for _address, path, device in mappings if path == exe), None)
    exe_fd = None
    if exe_device is None or not local.get(exe_device):
        errors.append(f"exe: {_not_local(exe_device)}")
    else:
        try:
            exe_fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            errors.append(f"exe: {exc.strerror}")
    exe_id = None
    if exe_fd is not None:
        st = os.fstat(exe_fd)
        exe_id = (st.st_dev, st.st_ino)
        held.append([exe or "?", exe_fd, True])
    for address, path, device in mappings[:MAX_FILES]:
        if not local.get(device):
            if path != exe:
                errors.append(f"{path}: {_not_local(device)}")
            continue
        try:
            fd = os.open(f"map_files/{address}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == exe_id or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if exe_id is not None and (st.st_dev, st.st_ino) == exe_id:
                held[0][0] = path  # the mapping's path is the one the core's notes use
            continue
        held.append([path, fd, False])


def _not_local(device: str | None) -> str:
    if device is None:
        return "not opened: not found in the process's maps"
    return f"not opened: device {device} is not a local filesystem (a FUSE or network server could block the handler)"


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe so each read returns up to a megabyte instead of 64 KiB."""
    import fcntl

    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass


def prefix_buffer(size: int = CORE_PREFIX, faulted: bool = True) -> memoryview:
    """A buffer for ``read_prefix``. ``faulted``: its pages are all faulted in now (bytearray writes its
    zeros), for a socket server's idle worker to make ahead of its crash. Else an anonymous mapping whose
    pages are faulted in only as the core fills them, for the pipe handler, which makes it while the kernel
    waits. Faulting in 4 MiB took 2.5-3.5 ms here, a quarter of a 1 MiB crash's time to reap."""
    if faulted:
        return memoryview(bytearray(size))
    import mmap

    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))  # not MAP_SHARED, the default: shmem


def read_prefix(fd: int, size: int, seconds: float, buffer: memoryview | None = None) -> tuple:
    """(bytes, at end of input) of the first ``size`` bytes of ``fd``, for at most ``seconds``, read into
    ``buffer`` (a prefix_buffer of at least ``size`` bytes) when given.

    Bounded by poll, not by an alarm: an exception between a read and its bookkeeping would lose
    bytes the compressor then never sees. A read error stops here; the compressor meets it again.
    """
    import select

    buffer = prefix_buffer(size, faulted=False) if buffer is None else buffer[:size]
    done, eof = 0, False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + seconds
    try:
        while done < size:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break
            n = os.readv(fd, [buffer[done:]])
            if n == 0:
                eof = True
                break
            done += n
    except OSError:
        pass
    return buffer[:done], eof


def release(fd: int) -> None:
    """Let go of the kernel's pipe: the kernel holds the crashed process (and its container's restart)
    until every reader has closed it. /dev/null takes the fd's place, so no later open reuses it."""
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)
    except OSError:
        try:
            os.close(fd)
        except OSError:
            pass


def take(argv: list, core_seconds: float = CORE_SECONDS) -> Capture:
    """The early stage of ``collect`` (see the module's text), for the kernel's pipe on stdin; never raises."""
    try:
        pid, pidfd = kernel_ids(argv)
    except Exception as exc:  # noqa: BLE001 - as in take_process
        cap = Capture()
        cap.errors.append(f"early capture: {type(exc).__name__}: {exc}")
        return cap
    return take_process(pid, pidfd, STDIN, core_seconds)


def take_process(pid: int | None, pidfd: int | None, core_fd: int = STDIN,
                 core_seconds: float = CORE_SECONDS) -> Capture:
    """The early stage for the crashed process ``pid`` whose core arrives on ``core_fd`` (the kernel's pipe,
    or a socket server's connection); never raises."""
    cap = take_proc(pid, pidfd)
    take_core(cap, core_fd, core_seconds)
    return cap


def take_proc(pid: int | None, pidfd: int | None, reader: MemoryReader | None = None) -> Capture:
    """The first half of ``take_process``: /proc and the held files, before any of the core is read (a
    socket server decides on them whether the kernel is to write the core at all; its worker passes the
    ``reader`` it forked while idle); never raises."""
    cap = Capture()
    try:
        if pid is not None:
            cap.proc = Proc(pid, pidfd)
            try:
                previous, timed = _signal.signal(_signal.SIGALRM, on_alarm), True
            except ValueError:  # not the main thread (a server's worker): its caller bounds the time
                previous, timed = None, False
            if timed:
                _signal.alarm(PROC_SECONDS)
            try:
                read_proc(cap.proc, hold=True, out=cap, reader=reader)
            except Timeout:
                cap.proc.timed_out = True
                cap.errors.append(f"reading /proc/{pid} took more than {PROC_SECONDS} s; the rest was skipped")
            finally:
                if timed:
                    _signal.alarm(0)
                    _signal.signal(_signal.SIGALRM, previous)
            if cap.proc.opened and not cap.proc.timed_out:
                cap.own_mounts = cap.proc.mnt_ns is None or cap.proc.mnt_ns != os.readlink("/proc/self/ns/mnt")
    except Exception as exc:  # noqa: BLE001 - the collection goes on from whatever was captured
        cap.errors.append(f"early capture: {type(exc).__name__}: {exc}")
    return cap


def take_core(cap: Capture, core_fd: int, core_seconds: float = CORE_SECONDS,
              buffer: memoryview | None = None) -> None:
    """The second half: the start of the core (into ``buffer``, a prefix_buffer, when given), and the kernel
    let go at once if that was all of it (and the process has no mounts of its own); never raises."""
    try:
        widen_pipe(core_fd)
        cap.core, cap.eof = read_prefix(core_fd, CORE_PREFIX, core_seconds, buffer)
        if cap.eof and not cap.own_mounts:
            release(core_fd)
            cap.released = True
    except Exception as exc:  # noqa: BLE001 - the collection goes on from whatever was captured
        cap.errors.append(f"early capture: {type(exc).__name__}: {exc}")
