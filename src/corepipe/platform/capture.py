"""The handler's first moments: everything that needs the crashed process, with nothing but ``os`` loaded.

The kernel keeps the crashed process (and its container's restart) until the handler closes
the pipe, and for a small core the handler's own start-up is most of that wait: the standard
library the rest of ``collect`` uses takes ~20 ms to import. So ``take`` runs first, before any
other corepipe module but procfs.py is imported: it parses the host PID and pidfd from the kernel's
arguments, has procfs.py read the raw ``/proc/<pid>`` files (the trust checks on them run later, in
snapshot.py, on the same bytes), opens the executable and mapped files that binaries.py and backtrace.py use later,
and reads the start of the core into memory. When the whole core fitted (``CORE_PREFIX``), the
pipe is let go at once and the kernel reaps the process; the config, the container, the storage
policy and the record are all decided afterwards, on what was captured here. Not so for a process
in a mount namespace of its own (a container): its runtime's state (runc's state.json, Docker's
config of a ``--rm`` container) can vanish with it, so services/collect.py lets go only once the container
is identified. A bigger core is read on from the pipe later, by compress.py (domain/corefile.py).

A file served by a user-space or network filesystem (FUSE, NFS, CIFS, 9p, ...) can block an open
or a read for as long as its server likes, and neither SIGALRM nor any other catchable signal
ends that wait; only SIGKILL does. So mapped files are opened only on filesystems the kernel
serves from local storage (``LOCAL_FILESYSTEMS``, decided from the mapping's device in ``maps``
and the mount tables: the process's own and the handler's), and on an overlay only when its layers
are (``judge``: opening an overlay's file opens its layer's); the others are listed in
``hold_errors`` and never touched. (procfs.py reads the /proc files that come from the process's
memory in a child killed at a deadline, for the same reason.)

Only ``os``, ``time``, ``_signal`` (the builtin behind ``signal``, without its ``enum``), and the small C
modules ``fcntl``, ``select`` and ``mmap`` may be imported here and in procfs.py (tests/unit/test_launcher.py
checks what is loaded when the pipe is let go). Annotations are strings (``from __future__``), so the
``X | None`` spelling costs no ``typing`` import. Nothing here raises: what fails is listed in ``errors``.
"""

from __future__ import annotations

import _signal
import os
import stat  # loaded by os already
import time

from corepipe.platform import memread, procfs

STDIN = 0
#: The kernel's arguments after ``collect [--config PATH]``: kernel.FIELDS, where pid and pidfd sit
#: (kernel.py checks these against FIELDS when it is imported).
CONFIG_OPTION = "--config"
ARG_COUNT = 12
PID_AT = 0
PIDFD_AT = 9
#: Filesystems whose files may be opened and read in the handler: served by the kernel from local storage,
#: so no server can stall an open or a read.
LOCAL_FILESYSTEMS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "squashfs", "erofs",
                               "vfat", "exfat", "f2fs", "iso9660", "ramfs", "devtmpfs", "jfs", "reiserfs",
                               "nilfs2", "hugetlbfs", "bcachefs", "udf", "ntfs3", "zfs", "shm"))
#: Mapped files held open at most.
MAX_FILES = 1024
#: Bytes of the core read before the pipe may be let go; a bigger core is streamed from the pipe.
CORE_PREFIX = 4 << 20
#: Bounds on this stage (the config's ``timeout`` is not known yet). A hostile process can stall a
#: /proc read or open (a FUSE-backed mapping) or its own dump: what was done by then is kept, the
#: rest of the collection goes on under the config's timeout.
PROC_SECONDS = 10
#: Filesystems that serve the files of others (their layers): local only when every layer is (``judge``).
STACKING = frozenset(("overlay",))
#: Overlays on overlays judged at most this deep.
MAX_STACK = 8
#: ioctl(2) on a namespace fd: its owning user namespace (linux/nsfs.h, _IO(0xb7, 0x1)).
_NS_GET_USERNS = 0xB701
_BLOCKS = " (a FUSE or network server could block the handler)"
CORE_SECONDS = 10
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031


class Timeout(Exception):
    """A time limit of the handler ran out (raised from SIGALRM)."""


def on_alarm(signum: int, frame: object) -> None:
    raise Timeout("the handler's time limit ran out")


class Capture:
    """What ``take`` got: the process's /proc data, its files held open, and the start of the core."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        #: When the collector took the crash (wall clock, sub-second): orders the crashes of one ``%t`` second.
        self.received = time.time()
        self.proc: procfs.Proc | None = None
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


def local_devices(mountinfo: bytes, own_userns: bool) -> dict:
    """{"major:minor": None when its files may be opened in the handler, else why not} from the handler's own
    mount table and the process's (overlayfs maps show the device of the layer below on older kernels, often
    in the host's table only). A device the handler's table shows was mounted where the handler lives, with
    its privilege; one only the process's shows, by whoever owns the process's mount namespace:
    ``own_userns`` says that is the handler's own user namespace (root), not an unprivileged user's."""
    try:
        mine = procfs.mounts(procfs.read("self", "mountinfo", procfs.PROC_LIMIT).decode("utf-8", "replace"))
    except OSError:
        mine = []
    result: dict = {}
    for table, privileged in ((mine, True), (procfs.mounts(mountinfo.decode("utf-8", "replace")), own_userns)):
        seen = set()
        for mount in table:
            if mount.device not in result or mount.device in seen:
                seen.add(mount.device)
                why = judge(mount, table, privileged)
                result[mount.device] = result.get(mount.device) or why
    return result


def judge(mount: procfs.Mount, table: list, privileged: bool, depth: int = 0) -> str | None:
    """None when a file on ``mount`` (a line of ``table``) may be opened and read in the handler, else why not.

    An overlay's files are its layers' files: opening one opens the layer's (a FUSE file's ``fuse_open``). Its
    layers are paths its mounter wrote, resolved when it was mounted. From a privileged mounter they are judged
    where ``table`` shows them (a layer out of its sight is root's own, as before); from an unprivileged one (a
    user namespace's) they are that user's word, which it can make name something else once mounted: never
    opened."""
    if mount.fstype in LOCAL_FILESYSTEMS:
        return None
    if mount.fstype not in STACKING:
        return f"{mount.fstype or 'of no known type'}, not a local filesystem{_BLOCKS}"
    if not privileged:
        return f"an overlay mounted in another user namespace (its layers are its mounter's word){_BLOCKS}"
    layers = procfs.overlay_layers(mount.options)
    if layers is None:
        return f"an overlay whose options do not say its layers for sure{_BLOCKS}"
    for layer in layers:
        below = procfs.mount_at(layer, table) if layer.startswith("/") else None
        if below is None or below.device == mount.device:
            continue  # not in this table's sight (relative to its mounter's cwd, or outside this root)
        why = judge(below, table, privileged, depth + 1) if depth < MAX_STACK else f"overlays too deep{_BLOCKS}"
        if why is not None:
            return f"an overlay whose layer {layer} is {why}"
    return None


def own_user_namespace(dir_fd: int) -> bool:
    """Whether the mount namespace of the process whose /proc/<pid> is ``dir_fd`` is owned by this handler's user
    namespace; False when it cannot be told."""
    import fcntl

    try:
        fd = os.open("ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            owner = fcntl.ioctl(fd, _NS_GET_USERNS)
        finally:
            os.close(fd)
        try:
            theirs, mine = os.fstat(owner), os.stat("/proc/self/ns/user")
        finally:
            os.close(owner)
        return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)
    except OSError:
        return False


def mapped_files(maps: str) -> list:
    """(address range as map_files names it, path, device "major:minor") of each distinct file-backed mapping in a
    /proc/<pid>/maps text (maps print the device in hex; mountinfo in decimal: this is the decimal form)."""
    seen, result = set(), []
    for mapping in procfs.mappings(maps):
        key = (mapping.device, mapping.inode)
        if mapping.inode != "0" and key not in seen:
            seen.add(key)
            # maps pads addresses to 8 digits, map_files names them without: 00400000 (a static executable's
            # first mapping) is map_files/400000-...
            result.append((f"{mapping.start:x}-{mapping.end:x}", mapping.path, procfs.decimal_device(mapping.device)))
    return result


def open_mapped(dir_fd: int, maps: str, exe: str | None, held: list, errors: list, local: dict) -> None:
    """Open the exe and each mapped regular file relative to a /proc/<pid> directory fd, adding
    ``[path, fd, is_exe]`` to ``held`` (as it goes: a timeout keeps what was opened) and failures to
    ``errors``. Only files on a device that ``local`` (local_devices) clears are opened. The fds keep the
    files reachable after the process is gone."""
    mappings = mapped_files(maps)
    exe_device = next((device for _address, path, device in mappings if path == exe), None)
    exe_fd = None
    if exe_device is None or _not_local(exe_device, local):
        errors.append(f"exe: {_not_local(exe_device, local)}")
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
        if _not_local(device, local):
            if path != exe:
                errors.append(f"{path}: {_not_local(device, local)}")
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


def hold_files(dir_fd: int, cap: Capture) -> None:
    """Open the exe and the mapped files of the process whose /proc/<pid> is ``dir_fd`` into ``cap``."""
    proc = cap.proc
    maps = proc.files.get("maps", b"").decode("utf-8", "replace")
    local = local_devices(proc.files.get("mountinfo", b""), own_user_namespace(dir_fd))
    open_mapped(dir_fd, maps, proc.links.get("exe"), cap.held, cap.hold_errors, local)


def _not_local(device: str | None, local: dict) -> str | None:
    """Why the files of ``device`` are not opened (an error's text), or None when they may be."""
    if device is None:
        return "not opened: not found in the process's maps"
    if device not in local:
        return f"not opened: device {device} is in no mount table{_BLOCKS}"
    return f"not opened: device {device} is {local[device]}" if local[device] else None


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


def take_proc(pid: int | None, pidfd: int | None, reader: memread.MemoryReader | None = None) -> Capture:
    """The first half of ``take_process``: /proc and the held files, before any of the core is read (a
    socket server decides on them whether the kernel is to write the core at all; its worker passes the
    ``reader`` it forked while idle); never raises."""
    cap = Capture()
    try:
        if pid is not None:
            cap.proc = procfs.Proc(pid, pidfd)
            try:
                previous, timed = _signal.signal(_signal.SIGALRM, on_alarm), True
            except ValueError:  # not the main thread (a server's worker): its caller bounds the time
                previous, timed = None, False
            if timed:
                _signal.alarm(PROC_SECONDS)
            try:
                procfs.read_proc(cap.proc, reader=reader, while_open=lambda dir_fd: hold_files(dir_fd, cap))
            except Timeout:
                cap.proc.timed_out = True
                cap.errors.append(f"reading /proc/{pid} took more than {PROC_SECONDS} s; the rest was skipped")
            finally:
                if timed:
                    _signal.alarm(0)
                    _signal.signal(_signal.SIGALRM, previous)
            if cap.proc.opened and not cap.proc.timed_out:
                cap.own_mounts = cap.proc.mnt_ns is None or cap.proc.mnt_ns != procfs.namespace("self", "mnt")
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
