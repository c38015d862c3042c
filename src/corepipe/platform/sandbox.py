"""Where a debugger runs on a crash: a uid nothing else has, no capability, no new privileges, and a root of its own.

A core and the files of the crashed process are hostile input, and so is every name in them:
gdb opens ``<sysroot>/<name>`` for each library in the core's link map, and a name like
``/../../tmp/fifo`` climbs out of any sysroot (a FIFO there hangs gdb; a device node may do
worse). So the debugger runs in private mount, PID, network and IPC namespaces, chrooted into a directory
that holds only the system's read-only trees (``SYSTEM_TREES``), a ``/proc`` of its own PID namespace
(the host's would lead out through ``/proc/1/root``), ``/dev/null`` and what the
caller binds in (its work directory, the saved binaries, source directories): a ``..`` stops at that root.
A source directory puts everything below it in reach of those names, so ``source_refusal`` keeps out
the ones that would undo the jail: ``/``, kernel filesystems, and (for a directory named by the
binary itself, or the one ``debug`` is run from) directories other users can write to. The root
itself is read-only too. Run by root (the collection-time backtrace, ``debug``), the debugger runs as a
uid taken from ``UID_RANGE`` that no process and no account uses, so no other user can read its fds
through ``/proc/<pid>/fd``, ptrace it or signal it, and it can read no file of root's that it was not
handed. Run by another user (``debug`` on their own store or a ``--remote`` crash), the namespaces are made
in a user namespace of its own that maps only that user (unprivileged user namespaces), and the debugger
keeps that uid without any capability. platform/gdb.py's options turn off everything gdb would run or
fetch on the core's say-so.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import stat
from typing import Callable, Optional

from corepipe.platform import libc, procfs

#: Environment variables gdb or its libraries would act on; never passed to a debugger.
UNSAFE_ENV = ("DEBUGINFOD_URLS", "GDBHISTFILE", "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME",
              "PYTHONSTARTUP")
#: Uids (and gids) reserved for debugger children: inside systemd's unused 0x70000000-0x7fffffff range,
#: above every container and subordinate-id range in common use.
UID_RANGE = (0x7F000000, 0x7FFFFFFE)
#: Read-only in the debugger's root, at the same paths (gdb and the libraries it loads live there).
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Never a source directory: kernel filesystems (a device node, a FIFO or a file that blocks on read).
KERNEL_TREES = ("/proc", "/sys", "/dev")
#: Never a source directory the binary names: where runtimes keep containers' files and state, which a crashed
#: container writes to (a FIFO it made there would hang gdb).
RUNTIME_TREES = ("/run", "/var/run", "/var/lib")

#: No capabilities from uid 0 at exec, no way back: SECBIT_NOROOT, _NO_SETUID_FIXUP, _NO_CAP_AMBIENT_RAISE, each
#: locked, and SECBIT_KEEP_CAPS locked off.
_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80


class SandboxError(OSError):
    """The debugger's sandbox could not be made; the message says which step."""


def _used_ids() -> set:
    """Every uid and gid of a running process or an account or group on this host."""
    used = procfs.ids_in_use()
    for path in ("/etc/passwd", "/etc/group"):
        try:
            with open(path, "rb") as f:
                for line in f:
                    fields = line.split(b":")
                    if len(fields) > 2 and fields[2].strip().isdigit():
                        used.add(int(fields[2]))
        except OSError:
            continue
    return used


def free_uid() -> int:
    """A uid (also used as the gid) in UID_RANGE that nothing on the host uses right now."""
    used = _used_ids()
    for _ in range(64):
        uid = random.randint(*UID_RANGE)
        if uid not in used:
            return uid
    raise SandboxError(f"no free uid in {UID_RANGE[0]}..{UID_RANGE[1]}")


def debugger_uid() -> Optional[int]:
    """The uid a debugger started by this process runs as: a free one for root; None for any other user, whose
    debugger keeps its uid (in a user namespace of its own, without capabilities)."""
    return free_uid() if os.geteuid() == 0 else None


def debugger_env(base: Optional[dict] = None) -> dict:
    """``base`` (default: a minimal environment) without the variables in UNSAFE_ENV."""
    env = dict(base) if base is not None else {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C"}
    return {key: value for key, value in env.items() if key not in UNSAFE_ENV}


def _below(path: str, trees: tuple) -> bool:
    return any(path == tree or path.startswith(tree.rstrip("/") + "/") for tree in trees)


def in_trees(path: str) -> bool:
    """``path`` is in one of the SYSTEM_TREES, which every Jail has."""
    return _below(os.path.realpath(path), SYSTEM_TREES)


def source_refusal(path: str, named_by: str) -> Optional[str]:
    """Why the directory ``path`` may not be bound into a debugger's root as a source directory; None if it may.
    ``named_by`` says who chose it: "user" (an option: only what would undo the jail is refused), "cwd" (where
    ``debug`` runs: also a directory others can write to) or "binary" (its DWARF, hostile: also a symlink, a
    top-level directory, the runtimes' trees and a directory that is neither root's nor the caller's)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if real == "/":
        return "it is the root directory"
    if _below(real, KERNEL_TREES):
        return "a kernel filesystem"
    if named_by == "user":
        return None
    if st.st_mode & 0o022:
        return "other users can write to it"
    if named_by == "cwd":
        return None
    if real != os.path.normpath(path):
        return "its path goes through a symlink or '..'"
    if real.count("/") < 2 or _below(real, RUNTIME_TREES):
        return "a system directory"
    if st.st_uid not in (0, os.getuid()):
        return f"owned by uid {st.st_uid}"
    return None


class Jail:
    """A root directory for the debugger: made (empty mount points) by ``prepare`` in the parent, entered by
    ``enter`` in the child between fork and exec. ``binds`` are (host path, path inside) pairs, read-only; the
    debugger starts in ``cwd`` (inside), or in ``/`` if that is not there."""

    def __init__(self, root: str, binds: list, cwd: str = "/"):
        self.root, self.cwd = root, cwd
        self.trees = [tree for tree in SYSTEM_TREES if os.path.isdir(tree) and not os.path.islink(tree)]
        self.binds = [(source, inside) for source, inside in binds if os.path.lexists(source)
                      and not (source == inside and in_trees(source))]
        self.links = [tree for tree in SYSTEM_TREES if os.path.islink(tree)]  # /lib -> usr/lib on merged /usr
        libc.load()  # before the fork: nothing to load in the child

    def prepare(self) -> None:
        os.mkdir(self.root, 0o755)
        for tree in self.trees + ["/proc"]:
            os.makedirs(self._inside(tree), 0o755, exist_ok=True)
        for tree in self.links:
            os.symlink(os.readlink(tree), self._inside(tree))
        os.makedirs(self._inside("/dev"), 0o755, exist_ok=True)
        open(self._inside("/dev/null"), "wb").close()
        for source, inside in self.binds:
            target = self._inside(inside)
            if os.path.isdir(source):
                os.makedirs(target, 0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                open(target, "ab").close()
        for directory, _dirs, _files in os.walk(self.root):
            os.chmod(directory, 0o755)

    def _inside(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _mount(self, source: Optional[str], target: str, fstype: Optional[str], flags: int) -> None:
        try:
            libc.mount(source, target, fstype, flags)
        except OSError as exc:
            raise SandboxError(exc.errno, exc.strerror) from None

    def _bind(self, source: str, target: str, extra: int = libc.MS_NOSUID | libc.MS_NODEV) -> None:
        self._mount(source, target, None, libc.MS_BIND | libc.MS_REC)
        # The source's own nosuid, nodev and noexec stay (in a user namespace they are locked: leaving one out
        # would fail the remount).
        kept = os.statvfs(source).f_flag & (libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
        self._mount(None, target, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | extra | kept)

    def enter(self) -> None:
        """In the child: private mount, PID, network and IPC namespaces (in a user namespace mapping only the
        caller, unless it is root), the binds, then chroot; the caller forks once more for the PID namespace to
        take effect (``preexec``). Raises SandboxError."""
        uid, gid = os.getuid(), os.getgid()
        user = libc.CLONE_NEWUSER if os.geteuid() != 0 else 0
        what = "NEWUSER|NEWNS" if user else "NEWNS"
        try:
            libc.unshare(user | libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWNET | libc.CLONE_NEWIPC,
                         f"unshare(CLONE_{what}|NEWPID|NEWNET|NEWIPC)")
        except OSError as exc:
            raise SandboxError(exc.errno, exc.strerror) from None
        if user:  # only the caller's uid and gid exist in it, as 0; no setgroups, ever
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        self._mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)  # nothing mounted here reaches the host
        for tree in self.trees:
            self._bind(tree, self._inside(tree))
        self._bind("/dev/null", self._inside("/dev/null"), extra=libc.MS_NOSUID)
        for source, inside in self.binds:
            self._bind(source, self._inside(inside))
        self._bind(self.root, self.root)  # and the root itself read-only: no node or file made in it
        os.chroot(self.root)
        try:
            os.chdir(self.cwd)
        except OSError:
            os.chdir("/")


def _wait_and_exit(pid: int) -> None:
    """The child that made the namespaces: wait for the debugger (the first process of the new PID namespace) and
    exit as it did. It closes every fd first, so its parent sees EOF on the debugger's output and on subprocess's
    exec-error pipe as soon as the debugger has them closed; it never returns."""
    code = 255
    try:
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        code = code if code >= 0 else 128 - code  # killed by a signal: as a shell says it
    finally:
        os._exit(code)


def _mount_proc() -> None:
    try:
        libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
    except OSError as exc:
        raise SandboxError(exc.errno, exc.strerror) from None


def _drop_capabilities() -> None:
    """Give up every capability for good, staying uid 0: root's own files in the jail (the core, the saved copies,
    sources) stay readable, but nothing can be mounted, chrooted, made (mknod), opened by handle or traced."""
    try:
        libc.prctl(libc.PR_SET_SECUREBITS, _SECUREBITS, "prctl(PR_SET_SECUREBITS)")
        for cap in range(64):
            try:
                libc.prctl(libc.PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # past the kernel's last capability
                    raise
        try:
            libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT)")
        except OSError:
            pass  # no ambient set on this kernel: nothing to clear
        libc.clear_capabilities()
    except OSError as exc:
        raise SandboxError(exc.errno, exc.strerror) from None


def preexec(jail: Optional[Jail], uid: Optional[int]) -> Callable[[], None]:
    """The function a debugger's child runs before exec: enter ``jail`` and fork, so that the debugger is the
    first process of a PID namespace of its own, with a ``/proc`` that shows only it and its children (the host's
    would lead out through ``/proc/<pid>/root``), no network and no shared IPC; then (with ``uid``) become that
    uid and gid with no groups, or (without) keep the caller's uid with no capabilities; always no new privileges
    and no core of its own. The forked-from child waits for
    the debugger and exits with its status (its parent's Popen sees that); the debugger dies with it."""
    libc.load()

    def run() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing gdb must not feed the handler again
        if jail is not None:
            jail.enter()
            pid = os.fork()
            if pid:
                _wait_and_exit(pid)
            _mount_proc()
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif jail is not None:
            _drop_capabilities()
        if jail is not None:  # after the uid change, which would clear it
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
        try:
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
        except OSError as exc:
            raise SandboxError(exc.errno, exc.strerror) from None

    return run
