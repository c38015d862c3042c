"""Every read and parse of Linux's /proc: the formats of /proc/<pid>/* (status, stat, limits, cgroup, maps,
mountinfo, cmdline, environ, the ns links, fdinfo) are known here and nowhere else.

The handler reads the crashed process's /proc/<pid> through ``Proc`` and ``read_proc`` before the kernel lets
the process go, so this module is imported on that path: only ``os`` and ``stat`` (``select`` when a memory
file is read), and annotations are strings (``from __future__``), as in capture.py. The directory
``/proc/<pid>`` is opened once and every file is read relative to it, so a PID recycled half-way cannot mix
two processes; the pidfd's owner is read before and after, and ``stat`` twice, for snapshot.py's checks. A
``Proc`` is one crash's: ``status`` is parsed once, on first use, for every reader of that crash.

The files the kernel reads out of the crashed process's memory (``MEMORY_FILES``: its argv and environment
can point into a FUSE-backed mapping) are read by memread.py's child, SIGKILLed at ``MEMORY_SECONDS``:
neither SIGALRM nor any other catchable signal ends such a wait.
"""

from __future__ import annotations

import os

from corepipe.platform.memread import MEMORY_SECONDS, MemoryReader, read_at, read_in_child

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

#: The /proc/<pid> files read (each at most PROC_LIMIT bytes: the config, with its proc_read_limit,
#: is read only later) and the links.
PROC_FILES = ("comm", "cmdline", "status", "limits", "cgroup", "maps", "mountinfo", "environ", "stat")
#: Those of PROC_FILES that the kernel reads from the process's memory (they can fault in a FUSE page).
MEMORY_FILES = ("cmdline", "environ")
PROC_LINKS = ("exe", "cwd", "root")
PROC_LIMIT = 1 << 20
#: A task's PF_DUMPCORE flag (field 9 of its stat): the thread that writes the core.
PF_DUMPCORE = 0x200
_HEX = frozenset("0123456789abcdef")


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
        #: An fd on its user namespace (``ns/user``): platform/userns.py finds the user who owns it.
        self.user_ns_fd: int | None = None
        self.errors: list = []
        #: False when the process was gone (or /proc unreadable) before anything was read.
        self.opened = False
        #: True when the caller's time ran out before every read was done.
        self.timed_out = False
        self._status: dict | None = None

    def status(self) -> dict:
        """The ``status`` file as read (``status_fields``), parsed on the first call only: the trust checks,
        the container, the storage policy and the record of this crash all use the one parse."""
        if self._status is None:
            self._status = status_fields(self.files.get("status", b""))
        return self._status


def read(pid: int | str, name: str, limit: int = 4096) -> bytes:
    """At most ``limit`` bytes of ``/proc/<pid>/<name>`` (``pid`` may be "self"); OSError when it is gone.
    Not for the crashed process's memory files (``read_in_child``)."""
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read(limit)


def exists(pid: int | str) -> bool:
    """Whether a process ``pid`` exists now."""
    return os.path.exists(f"/proc/{pid}")


def read_proc(proc: Proc, limit: int = PROC_LIMIT, reader: MemoryReader | None = None,
              while_open: Callable[[int], None] | None = None) -> None:
    """Fill ``proc`` (its files, links and namespaces, the pidfd's owner before and after). ``reader``, forked
    ahead, reads MEMORY_FILES (else ``read_in_child`` forks one now). ``while_open`` is called with the
    /proc/<pid> directory fd after the reads, before it is closed (capture.py opens the mapped files then)."""
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
                proc.files[name] = read_at(dir_fd, name, limit)
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
            proc.user_ns_fd = os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            proc.errors.append(f"ns/user: {exc.strerror}")
        try:
            proc.stat_again = read_at(dir_fd, "stat", 4096)
        except OSError:
            pass
        if proc.pidfd is not None:
            proc.owner_after = pidfd_pid(proc.pidfd)
        if while_open is not None:
            while_open(dir_fd)
    finally:
        os.close(dir_fd)


def pidfd_pid(pidfd: int) -> int | None:
    """The PID a pidfd refers to, from its fdinfo: -1 once the process is gone, None if unknown."""
    try:
        for line in read("self", f"fdinfo/{pidfd}").splitlines():
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the formats ---------------------------------------------------------------------------------------


def status_fields(data: bytes) -> dict:
    """{key: value} of a /proc/<pid>/status text ("Uid:\t0\t0\t0\t0" is "Uid": "0\t0\t0\t0")."""
    result = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            result[key] = value.strip()
    return result


def kib(*values: str | None) -> int | None:
    """The sum of status figures like "1234 kB"; None if the first is missing or any is not a figure."""
    if not values or values[0] is None:
        return None
    total = 0
    for value in values:
        try:
            total += int((value or "0").split()[0])
        except (ValueError, IndexError):
            return None
    return total


def nul_list(raw: bytes) -> list:
    """The strings of a NUL-separated file (cmdline, environ); [] for an empty one (a kernel thread)."""
    return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


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


def start_ticks(stat: bytes) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started (clock ticks since boot)."""
    return stat_field(stat, 22)


def started(pid: int | str) -> int | None:
    """The start time (``start_ticks``) of the process ``pid`` now ("self" for this one); OSError if gone."""
    return start_ticks(read(pid, "stat"))


def exited(stat: bytes) -> bool:
    """Whether the process of this stat has died (field 3, its state: Z a zombie not reaped yet, X dead)."""
    _, _, rest = stat.rpartition(b")")
    return rest.split()[:1] in ([b"Z"], [b"X"])


def dump_signal(stat: bytes) -> int | None:
    """The fatal signal of a process dumping core: field 52 of /proc/<pid>/stat (``exit_code``) is its thread
    group's exit code while it exits, which is the signal until the dump ends. None if it is not one."""
    code = stat_field(stat, 52)
    return code & 0x7F if code is not None and 0 < code & 0x7F < 65 else None


def cpu_of(tid: int) -> int | None:
    """The CPU the thread ``tid`` ran on last (field 39 of its stat), None if it is gone."""
    try:
        return stat_field(read(tid, "stat"), 39)
    except OSError:
        return None


def dumping_thread(pid: int) -> int | None:
    """The thread of ``pid`` that dumps (PF_DUMPCORE in its stat flags), the kernel's %I."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    if len(tasks) == 1:
        return int(tasks[0])
    for tid in tasks:
        try:
            flags = stat_field(read(pid, f"task/{tid}/stat"), 9)
        except OSError:
            continue
        if flags is not None and flags & PF_DUMPCORE:
            return int(tid)
    return None


def core_limit(limits: bytes, unlimited: int) -> int | None:
    """The soft RLIMIT_CORE in a /proc/<pid>/limits text; ``unlimited`` stands for "unlimited"."""
    for line in limits.decode("ascii", "replace").splitlines():
        if line.startswith("Max core file size"):
            soft = line[len("Max core file size"):].split()[:1]
            if soft == ["unlimited"]:
                return unlimited
            if soft and soft[0].isdigit():
                return int(soft[0])
    return None


def cgroup_entries(text: str) -> list:
    """(hierarchy id, controllers, path) of each line of a /proc/<pid>/cgroup text (v1, v2 and hybrid)."""
    result = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) == 3 and parts[0].isdigit():
            result.append((parts[0], parts[1], parts[2]))
    return result


class Mount:
    """One line of a mountinfo text: the device "major:minor" (decimal), the mount's root in its filesystem,
    where it is mounted, the filesystem type, the source and the superblock's options."""

    __slots__ = ("device", "root", "target", "fstype", "source", "options")

    def __init__(self, device: str, root: str, target: str, fstype: str, source: str, options: str):
        self.device, self.root, self.target = device, root, target
        self.fstype, self.source, self.options = fstype, source, options


def mounts(text: str) -> list:
    """The ``Mount`` of each well-formed line of a /proc/<pid>/mountinfo text. Paths keep the kernel's octal
    escapes (a space is \\040), as the mount table prints them."""
    result = []
    for line in text.splitlines():
        fields = line.split(" ", 5)
        if len(fields) < 6:
            continue
        _, sep, after = fields[5].partition(" - ")
        tail = after.split(" ", 2) if sep else []
        result.append(Mount(fields[2], fields[3], fields[4], tail[0] if tail else "",
                            tail[1] if len(tail) > 1 else "", tail[2] if len(tail) > 2 else ""))
    return result


def unescape(text: str) -> str:
    """A mountinfo field without the kernel's octal escapes (\\040 is a space, \\134 a backslash)."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        code = text[i + 1:i + 4]
        if text[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


#: The options of an overlay mount that name its layers (lowerdir holds several, ':'-separated).
OVERLAY_LAYERS = ("lowerdir", "lowerdir+", "datadir+", "upperdir", "workdir")


def overlay_layers(options: str) -> list | None:
    """The layer paths an overlay mount's superblock options name, as its mounter wrote them; None when they cannot
    be read for sure (none at all, or an escaped ':' or a backslash in one)."""
    layers = []
    for option in options.split(","):
        key, sep, value = option.partition("=")
        if not sep or key not in OVERLAY_LAYERS:
            continue
        value = unescape(value)
        if "\\" in value:
            return None
        layers += [layer for layer in value.split(":") if layer]  # "::" sets off data-only lower layers
    return layers or None


def mount_at(path: str, table: list) -> Mount | None:
    """The mount of ``table`` (``mounts``) that ``path`` (absolute, in the table's root) lies on: the longest mount
    point above it, the last mounted of equal ones (it covers the others)."""
    found, length = None, -1
    for mount in table:
        target = unescape(mount.target).rstrip("/")
        if (path == target or path.startswith(target + "/") or not target) and len(target) >= length:
            found, length = mount, len(target)
    return found


class Mapping:
    """One file-backed line of a /proc/<pid>/maps text: its address range, file offset, device
    "major:minor" (hex, as maps print it), inode and path."""

    __slots__ = ("start", "end", "offset", "device", "inode", "path")

    def __init__(self, start: int, end: int, offset: int, device: str, inode: str, path: str):
        self.start, self.end, self.offset = start, end, offset
        self.device, self.inode, self.path = device, inode, path


def mappings(maps: str) -> list:
    """The ``Mapping`` of each line of a maps text that names a file (a path from "/"), in order."""
    result = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/") or not _is_range(parts[0]):
            continue
        start, _, end = parts[0].partition("-")
        try:
            offset = int(parts[2], 16)
        except ValueError:
            continue
        result.append(Mapping(int(start, 16), int(end, 16), offset, parts[3], parts[4], parts[5]))
    return result


def _is_range(text: str) -> bool:
    start, sep, end = text.partition("-")
    return bool(sep) and all(0 < len(x) <= 16 and _HEX.issuperset(x) for x in (start, end))


def decimal_device(text: str) -> str:
    """A maps device ("fd:01", hex) as mountinfo and stat name it ("253:1"); "?" when it is not one."""
    major, _, minor = text.partition(":")
    try:
        return f"{int(major, 16)}:{int(minor, 16)}"
    except ValueError:
        return "?"


def namespace(pid: int | str, kind: str, proc_root: str = "/proc") -> str:
    """The ``ns/<kind>`` link of a process ("mnt:[4026531841]"); OSError when it is gone."""
    return os.readlink(f"{proc_root}/{pid}/ns/{kind}")


def open_namespace(pid: int | str, kind: str) -> int:
    """An fd on the ``ns/<kind>`` of a process (for setns or the nsfs ioctls); OSError when it is gone."""
    return os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)


def ids_in_use() -> set:
    """Every uid and gid (real, effective, saved, filesystem) of a process running now."""
    used = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for line in read(name, "status").splitlines():
                if line.startswith((b"Uid:", b"Gid:")):
                    used.update(int(x) for x in line.split()[1:])
        except (OSError, ValueError):
            continue
    return used
