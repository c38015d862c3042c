"""``corepipe debug``: gdb on a crash's core, with the executable and libraries saved at collection.

The core is decompressed (and checked) into a private temporary directory with a sysroot of
symlinks from the crashed process's paths to the saved copies in ``<store>/.build-id``, so
gdb finds the container's files after the container and its image are gone. The debugger runs
on names the crashed process chose (the libraries in the core's link map), so it runs in
platform/sandbox.py's root: the system's read-only trees, the core, the sysroot and the saved
binaries (each at its own path), nothing else (a ``/../..`` in a name stops there), in PID,
network and IPC namespaces of its own, without any capability, with the same gdb options as the
collection-time backtrace. Run by root, gdb runs as a one-off uid: the core and copies of the saved
binaries (the store's are root's alone) are given to that uid. Run by another user (their own store,
or ``--remote``), gdb keeps their uid, in a user namespace of its own. A crash fetched with ``--remote``
never falls back on this host's files. The directory is removed when the debugger exits, Ctrl-C included.

Sources are on the host, not in the store: the directories the executable was compiled in (its
DWARF's DW_AT_comp_dir), the one ``debug`` runs from (gdb starts there), and those named by
``--source`` and ``--substitute-path`` are bound read-only into the root at their own paths, when
platform/sandbox.py's ``source_refusal`` allows them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Optional

from corepipe.commands import lookup
from corepipe.domain import binaries
from corepipe.platform import elf, gdb, sandbox, sysroot, unpack
from corepipe.platform.errors import UsageError, UserError
from corepipe.platform.log import clean
from corepipe.platform.store import BUILD_ID

HELP = "start gdb on a crash's core with its saved executable and libraries (default: the latest crash)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", nargs="?", help="crash id or a unique prefix of it (default: the latest)")
    parser.add_argument("--debugger", metavar="CMD", default="gdb",
                        help="debugger command (default gdb); others get EXE CORE and $COREPIPE_SYSROOT")
    parser.add_argument("--source", metavar="DIR", action="append", default=[],
                        help="also look for source files in DIR (repeatable)")
    parser.add_argument("--substitute-path", nargs=2, metavar=("FROM", "TO"), action="append", default=[],
                        help="source files the binary names under FROM are in TO (repeatable), e.g. /src ~/work/app")
    parser.add_argument("args", nargs="*", metavar="-- ARGS",
                        help="more debugger arguments after '--' (options go before ID), e.g. ID -- -batch -ex bt")
    lookup.add_remote_option(parser)


def _on_this_host(rec: dict, remote: bool) -> bool:
    """Whether the crashed process's files are this host's: a host process's, and not a crash fetched with
    ``--remote`` (a node's record naming paths must never make gdb read the operator's own files)."""
    return not remote and (rec.get("container") or {}).get("runtime") == "host"


def links(store: str, rec: dict, remote: bool) -> list:
    """(path in the crashed process, file to use) for its exe and libraries: the copies saved with the
    crash, and for a process of this host the host's own files where no copy was saved."""
    result = []
    host = _on_this_host(rec, remote)
    for entry in (rec.get("binaries") or {}).get("files") or []:
        path, target = entry.get("path"), binaries.saved_path(store, entry)
        if target is not None:
            result.append((path, target))
        elif binaries.stored_name(entry) and entry.get("stored"):
            print(f"corepipe debug: warning: the saved copy of {path} is gone from the store", file=sys.stderr)
        elif host and isinstance(path, str) and os.path.isfile(path):
            result.append((path, path))
    return result


def _executable(rec: dict, made: dict, remote: bool) -> Optional[str]:
    """The saved exe; for a process of this host without one, the exe on the host if its build-id still matches."""
    for entry in (rec.get("binaries") or {}).get("files") or []:
        if entry.get("exe") and entry.get("path") in made:
            return made[entry["path"]]
    exe = rec.get("exe")
    if not _on_this_host(rec, remote) or not exe or not os.path.isfile(exe):
        print("corepipe debug: warning: the executable was not saved; gdb gets the core only", file=sys.stderr)
        return None
    recorded = next((e.get("build_id") for e in (rec.get("binaries") or {}).get("files") or [] if e.get("exe")), None)
    if recorded:
        with open(exe, "rb") as f:
            if elf.build_id(f.fileno()) != recorded:
                print(f"corepipe debug: warning: {exe} has changed since the crash (build-id differs)", file=sys.stderr)
    return exe


def debugger_argv(debugger: str) -> list:
    try:
        argv = shlex.split(debugger)
    except ValueError as exc:
        raise UsageError(f"--debugger {debugger!r}: {exc}") from None
    found = shutil.which(argv[0]) if argv else None
    if found is None:
        raise UserError(f"debugger {argv[0] if argv else debugger!r} not found; install gdb or pass --debugger CMD")
    return [os.path.abspath(found)] + argv[1:]  # a path: it is bound at the same place in the sandbox


def _quoted(path: str) -> str:
    """``path`` as one argument of a gdb command that splits its arguments (directory, set substitute-path)."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command(argv: list, extra: list, exe: Optional[str], core: str, root: str, search: list,
            sources: Sources) -> list:
    argv = list(argv)
    if not os.path.basename(argv[0]).startswith("gdb"):
        return argv + extra + ([exe] if exe else []) + [core]
    # The saved files come from the container: never let gdb run scripts or libthread_db from them.
    argv += ["-q", *gdb.HARDENING, "-iex", f"set sysroot {root}",
             "-iex", f"set solib-search-path {':'.join(search)}"]
    for directory in sources.directories:
        argv += ["-iex", f"directory {_quoted(directory)}"]
    for old, new in sources.substitutions:
        argv += ["-iex", f"set substitute-path {_quoted(old)} {_quoted(new)}"]
    return argv + extra + ([exe] if exe else []) + ["-c", core]  # -c: a lone core is not taken for an exe


class Sources:
    """Where gdb looks for source files, and what the debugger's root needs for that: ``binds`` (host
    directories, read-only at their own paths), ``directories`` and ``substitutions`` for gdb, ``cwd``."""

    def __init__(self, named: list, substitutions: list):
        self.binds: list = []
        self.directories = [self._named(path, "--source") for path in named]
        self.substitutions = [(old, self._named(new, "--substitute-path")) for old, new in substitutions]
        self.cwd = "/"

    def _named(self, path: str, option: str) -> str:
        if ":" in path:
            raise UsageError(f"{option} {path}: gdb cannot take a directory whose name has ':'; use a symlink")
        real = os.path.realpath(os.path.expanduser(path))
        refusal = sandbox.source_refusal(real, "user")
        if refusal:
            raise UsageError(f"{option} {path}: {refusal}; name a directory that holds the sources")
        self.binds.append((real, real))
        return real

    def add_found(self, exe: Optional[str]) -> None:
        """The directory ``debug`` runs from (gdb starts there) and the executable's compile directories."""
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = None
        if cwd and self._automatic(cwd, "cwd", "the current directory"):
            self.cwd = cwd
        for directory in _compile_dirs(exe) if exe else []:
            self._automatic(directory, "binary", "the compile directory")

    def _automatic(self, path: str, named_by: str, what: str) -> bool:
        if any(inside == path for _source, inside in self.binds):
            return True
        refusal = sandbox.source_refusal(path, named_by)
        if refusal is None:
            self.binds.append((path, path))
            return True
        if path != "/" and os.path.isdir(path):  # one that is not there is no news
            print(f"corepipe debug: note: {what} {clean(path)} is not shown to gdb ({refusal}); "
                  f"pass --source {clean(shlex.quote(path))} to use it", file=sys.stderr)
        return False


def _compile_dirs(exe: str) -> list:
    """The executable's compile directories; none if it cannot be read as a regular file. (``exe`` is a link
    in the sysroot to the saved copy, or for a host process the file on the host.)"""
    try:
        fd = os.open(exe, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return elf.compile_dirs(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else []
    finally:
        os.close(fd)


def _binds(saved: str, links: list, made: dict) -> list:
    """(host path, path inside) for the debugger's root: the directory of the saved binaries (or their copies),
    and host files used in place."""
    return [(saved, saved)] + [(target, target) for path, target in links
                               if path in made and not target.startswith(saved + "/")]


def _given(work: str, store: str, links: list, uid: int) -> list:
    """``links`` with each saved copy (root's alone in the store) replaced by a copy in ``work/files`` that
    ``uid`` owns and may only read; host files used in place stay (the debugger reads them as others may)."""
    saved = os.path.join(store, BUILD_ID) + "/"
    files = os.path.join(work, "files")
    os.mkdir(files, 0o700)
    given = []
    for n, (path, target) in enumerate(links):
        if target.startswith(saved):
            copy = os.path.join(files, str(n))
            shutil.copyfile(target, copy, follow_symlinks=False)
            os.chown(copy, uid, uid)
            os.chmod(copy, 0o400)
            target = copy
        given.append((path, target))
    os.chmod(files, 0o755)
    return given


def run(ns: argparse.Namespace) -> int:
    crash_id, extra = ns.id, list(ns.args)
    if crash_id is not None and crash_id.startswith("-"):  # 'debug -- -batch ...': no id, all for the debugger
        crash_id, extra = None, [crash_id] + extra
    debugger = debugger_argv(ns.debugger)
    sources = Sources(ns.source, ns.substitute_path)
    path, rec = lookup.lookup(ns, crash_id)
    with lookup.local_copy(ns, path, rec, with_binaries=True) as (local, store):
        return _debug(local, store, rec, debugger, extra, sources, getattr(ns, "remote", None) is not None)


def _debug(path: str, store: str, rec: dict, debugger: list, extra: list, sources: Sources, remote: bool) -> int:
    try:
        uid = sandbox.debugger_uid()
    except sandbox.SandboxError as exc:
        raise UserError(f"cannot start the debugger in its sandbox: {exc}") from None
    source = unpack.open_core(path, rec)
    work = tempfile.mkdtemp(prefix="corepipe-debug-")
    try:
        lookup.check_room(work, rec, "set TMPDIR to a bigger filesystem")
        core = os.path.join(work, "core")
        fd = os.open(core, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            unpack.to_fd(source, rec, fd)
            if uid is not None:
                os.fchown(fd, uid, uid)
        finally:
            os.close(fd)
            os.close(source)
        root = os.path.join(work, "root")
        os.mkdir(root, 0o755)
        wanted = links(store, rec, remote)
        if uid is not None:
            wanted = _given(work, store, wanted, uid)
        made = sysroot.build(root, wanted, dir_mode=0o755)
        search = sorted({os.path.dirname(link) for link in made.values()})
        exe = _executable(rec, made, remote)
        sources.add_found(exe)
        own = [path for path in (debugger[0], exe) if path and not path.startswith(work + "/")]
        saved = os.path.join(work, "files") if uid is not None else os.path.join(store, BUILD_ID)
        # Bound at their own paths, so what gdb prints names the files as they are on the host.
        jail = sandbox.Jail(os.path.join(work, "jail"), [(core, core), (root, root), *_binds(saved, wanted, made),
                                                          *((p, p) for p in own), *sources.binds], cwd=sources.cwd)
        jail.prepare()
        argv = command(debugger, extra, exe, core, root, search, sources)
        # Ctrl-C is the debugger's: a no-op handler (not SIG_IGN, which the debugger would inherit).
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            env = sandbox.debugger_env({**os.environ, "COREPIPE_SYSROOT": root})
            return subprocess.run(argv, env=env, cwd="/", preexec_fn=sandbox.preexec(jail, uid)).returncode
        except (OSError, subprocess.SubprocessError) as exc:
            advice = "run as root" if os.geteuid() == 0 else (
                "a user other than root needs unprivileged user namespaces (sysctl user.max_user_namespaces)")
            raise UserError(f"cannot start the debugger in its sandbox: {exc}; {advice}") from None
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        shutil.rmtree(work, ignore_errors=True)
