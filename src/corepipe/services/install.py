"""Turning corepipe on and off on a host: launcher, config, store, kernel settings, sysctl drop-in.

Everything install changes is written down in a state file beside the config (the previous
kernel values and the previous content of every file it wrote), so uninstall puts back
exactly what was there. A failed install undoes what it did before reporting the error.
Every path is a parameter (``Paths``) so tests run it against temporary files and a fake
/proc/sys.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from corepipe.platform import config as configuration
from corepipe.platform import coredump_socket, forward, fs, kernel, launcher, static_forwarder
from corepipe.platform.errors import UserError
from corepipe.platform.fs import write_all
from corepipe.platform.sysctl import CORE_PATTERN, CORE_PIPE_LIMIT, PROC_SYS, Sysctl, SysctlError
from corepipe.services import prune

#: core_pipe_limit: non-zero makes the kernel wait for the handler before reaping the process, so
#: /proc/<pid> stays readable (0 would not wait). It only caps handlers holding the kernel's pipe, and
#: a crash beyond it is skipped by the kernel with nothing but an "over core_pipe_limit" line: so it is
#: set well above any storm the host can run handlers for (a handler refused a core slot costs ~12 MB
#: and lets go within seconds; 128 crashes at once peaked at 0.2-0.4 GiB here), and the handlers bound
#: their own heavy work host-wide (platform/slots.py): cores for concurrent_cores at a time, a record
#: with the reason for the rest.
PIPE_LIMIT = 256
#: Sorted after systemd's 50-coredump.conf so it wins at boot; /etc/sysctl.conf (99-sysctl.conf) still wins.
DROPIN_NAME = "90-corepipe.conf"
STATE_NAME = "install.json"
LAUNCHER_MARK = "# corepipe launcher: written by 'corepipe install', removed by 'corepipe uninstall'"
#: %F (a pidfd of the crashed process) arrived in Linux 6.16; older kernels expand it to nothing.
PIDFD_KERNEL = (6, 16)
#: ``--mode``: the kernel's pipe runs ``corepipe collect`` per crash, or the resident ``corepipe serve`` takes
#: them on its socket (Linux 6.16+).
PIPE, SOCKET = "pipe", "socket"
#: What ``--mode auto`` says on a kernel with the coredump socket (docs/performance.md has the figures).
AUTO_FASTER = "pipe mode with the static forwarder is the faster for big cores; --mode pipe|socket chooses"
AUTO_PIPE = ("auto picked pipe mode although this kernel has the coredump socket: serve reads a big core faster "
             "from the static forwarder's pipe than from the socket (docs/performance.md); --mode socket takes it")
#: The kernel's own default, given back when what was there before is unknown.
DEFAULT_PATTERN = "core"


class InstallError(UserError):
    """Install or uninstall cannot go on; the message says why and what to do."""


@dataclass
class Paths:
    bin: str = "/usr/local/bin/corepipe"
    config: str = configuration.DEFAULT_PATH
    sysctl_dir: str = "/etc/sysctl.d"
    proc_sys: str = PROC_SYS

    @property
    def state(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.config)), STATE_NAME)

    @property
    def dropin(self) -> str:
        return os.path.join(self.sysctl_dir, DROPIN_NAME)

    @property
    def forwarder(self) -> str:
        """The static forwarder, beside the launcher (the pattern's program where it could be built)."""
        return os.path.join(os.path.dirname(os.path.abspath(self.bin)), static_forwarder.NAME)


def kernel_has_pidfd(release: str) -> bool:
    """Whether the running kernel (``os.uname().release``) expands %F; by version, as a probe needs a crash."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= PIDFD_KERNEL


def is_handler(pattern: str) -> bool:
    """A pattern that hands cores to a program or socket (systemd-coredump, apport, corepipe, ...)."""
    return pattern.startswith(("|", "@"))


def describe(pattern: str) -> str:
    for needle, name in (("systemd-coredump", "systemd-coredump"), ("apport", "apport"), ("abrt", "abrt")):
        if needle in pattern:
            return name
    if kernel.is_corepipe_pattern(pattern):
        return "another corepipe installation"
    return "another handler"


def launcher_text(python: str, forward_socket: str = forward.DEFAULT_SOCKET) -> str:
    """A script the kernel can run with an empty environment (see launcher.py), marked as ours."""
    if not os.path.isabs(python) or any(c.isspace() for c in python):
        raise InstallError(f"the interpreter path {python!r} must be absolute and without spaces")
    shebang, _, body = launcher.script(python, forward=forward_socket).partition("\n")
    return f"{shebang}\n{LAUNCHER_MARK}\n{body}"


def dropin_text(pattern: str, pipe_limit: int) -> str:
    return (f"# Written by 'corepipe install'; removed by 'corepipe uninstall'.\n"
            f"{CORE_PIPE_LIMIT} = {pipe_limit}\n{CORE_PATTERN} = {pattern}\n")


def load_state(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        return None
    except PermissionError:
        raise UserError(f"cannot read the install state {path}: permission denied; run as root") from None
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read the install state {path}: {exc}; fix or remove it") from None
    if not isinstance(state, dict) or state.get("schema") != 1:
        raise InstallError(f"{path} is not a corepipe install state; remove it or pass the right --config")
    return state


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically (fs.replace): a reader sees the old or the new file."""
    fs.replace(path, lambda fd: write_all(fd, data), mode=mode)


def _saved(path: str) -> Optional[dict]:
    """A file's content and mode as the state keeps them; None if there is no such file."""
    data = _read(path)
    if data is None:
        return None
    return {"data": base64.b64encode(data).decode(), "mode": os.stat(path).st_mode & 0o7777}


def _restore_file(path: str, saved: Optional[dict]) -> None:
    """Put back a file as ``_saved`` found it, or remove it if it did not exist."""
    if saved is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        _write_file(path, base64.b64decode(saved["data"]), saved["mode"])


def _makedirs(path: str, created: list) -> None:
    """mkdir -p that remembers which directories it made (uninstall removes them if empty)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        created.append(directory)


def _check_store(store: str) -> str:
    """The store must be a dedicated directory below a top-level one: --purge deletes it."""
    store = os.path.normpath(store)
    if not os.path.isabs(store) or store.count("/") < 2:
        raise InstallError(f"--store {store} must be an absolute path of a dedicated directory, "
                           f"e.g. {configuration.DEFAULT_STORE}")
    return store


class _Changes:
    """What install has done so far, with the steps to undo it if a later step fails."""

    def __init__(self, state: dict):
        self.state = state
        self.done: list = []
        self.undo: list = []

    def file(self, path: str, data: bytes, mode: int, what: str) -> None:
        old = _saved(path)
        if old is not None and base64.b64decode(old["data"]) == data and old["mode"] == mode:
            return
        self.state["files"].setdefault(path, old)
        self.undo.append(lambda: _restore_file(path, old))
        _write_file(path, data, mode)
        self.done.append(f"wrote {what} {path}")

    def rollback(self) -> None:
        for step in reversed(self.undo):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep undoing; the user is told what is left
                print(f"corepipe install: could not undo a step: {exc}", file=sys.stderr)


def choose_mode(mode: str, proc_sys: str = PROC_SYS, forwarder: bool = False, installed: Optional[str] = None) -> str:
    """``pipe`` or ``socket`` for ``--mode auto|socket|pipe``. auto keeps an installation's mode (``installed``);
    else it is pipe wherever the static forwarder is built (``forwarder``): serve then reads each core from the
    kernel's pipe, which carries a big core faster than the coredump socket (AUTO_PIPE); else socket where
    kernel.core_modes lists it (no Python started per crash), else pipe."""
    if mode not in ("auto", PIPE, SOCKET):
        raise InstallError(f"unknown --mode {mode!r}; use auto, socket or pipe")
    has_socket = "socket" in coredump_socket.core_modes(proc_sys)
    if mode == "auto":
        if installed in (PIPE, SOCKET) and (installed == PIPE or has_socket):
            return installed
        return SOCKET if has_socket and not forwarder else PIPE
    if mode == SOCKET and not has_socket:
        raise InstallError("this kernel has no coredump socket mode (kernel.core_modes lacks 'socket', Linux 6.16+); "
                           "use --mode pipe or --mode auto")
    return mode


def install(paths: Paths, store: Optional[str] = None, force: bool = False, python: str = sys.executable,
            release: Optional[str] = None, mode: str = PIPE, socket_path: str = coredump_socket.DEFAULT_SOCKET,
            forward_socket: str = forward.DEFAULT_SOCKET) -> list:
    """Install or update in place; returns the lines to print (empty changes mean nothing was done).

    Both modes write the pipe pattern to the kernel and its sysctl drop-in: in socket mode it is what
    collects whenever ``corepipe serve`` is not running (at boot, between restarts, after a crash of the
    server), and the server switches the kernel to its socket while it runs and back when it stops. The
    pattern's program is the static forwarder where it can be built here, else the Python launcher."""
    asked = mode
    choose_mode(asked, paths.proc_sys)  # an unknown mode, or socket without the kernel's: before any work
    coredump_socket.pattern(socket_path)  # an absolute path without spaces, or ValueError
    sysctl = Sysctl(paths.proc_sys)
    try:
        sysctl.check_writable(CORE_PATTERN, CORE_PIPE_LIMIT)
        current = sysctl.read(CORE_PATTERN)
        current_limit = sysctl.read(CORE_PIPE_LIMIT)
    except SysctlError as exc:
        raise InstallError(str(exc)) from None
    pidfd = kernel_has_pidfd(release if release is not None else os.uname().release)
    config_arg = None if os.path.abspath(paths.config) == configuration.DEFAULT_PATH else os.path.abspath(paths.config)
    try:
        pattern = kernel.build_pattern(os.path.abspath(paths.bin), config_arg, pidfd=pidfd)
    except ValueError as exc:
        raise InstallError(f"{exc}; use shorter --bin/--config paths") from None

    old = load_state(paths.state)
    forwarder, why_not = _static_forwarder(paths, old, forward_socket, force)
    if forwarder is not None:
        try:
            pattern = kernel.build_pattern(paths.forwarder, config_arg, pidfd=pidfd)
        except ValueError as exc:
            forwarder, why_not = None, str(exc)
    mode = choose_mode(asked, paths.proc_sys, forwarder is not None, (old or {}).get("mode"))
    if old is not None and (old["bin"], old["dropin"]) != (os.path.abspath(paths.bin), paths.dropin):
        raise InstallError(f"installed with --bin {old['bin']} and drop-in {old['dropin']}; "
                           "run 'corepipe uninstall' first to change them")
    ours = old is not None and current in (old["pattern"], socket_pattern(old))
    if not ours and is_handler(current) and not force:
        raise InstallError(f"kernel.core_pattern belongs to {describe(current)} ({current!r}); "
                           "run again with --force to replace it (uninstall gives it back)")
    previous = old["previous"] if ours else {CORE_PATTERN: current, CORE_PIPE_LIMIT: current_limit}
    if not ours and current == pattern:
        # Our own pattern without our state (the state was lost): giving it back would point at nothing.
        previous = {CORE_PATTERN: DEFAULT_PATTERN, CORE_PIPE_LIMIT: "0"}
    state = {
        "schema": 1,
        "bin": os.path.abspath(paths.bin),
        "config": os.path.abspath(paths.config),
        "dropin": paths.dropin,
        "pattern": pattern,
        "pipe_limit": PIPE_LIMIT,
        "pidfd": pidfd,
        "mode": mode,
        "socket": socket_path if mode == SOCKET else None,
        "forward_socket": forward_socket,
        "forwarder": paths.forwarder if forwarder is not None else None,
        "previous": previous,
        "files": dict(old["files"]) if old else {},
        "dirs": list(old["dirs"]) if old else [],
        "store": None,
        "store_created": False,
    }
    existing = _read(paths.bin)
    if existing is not None and state["bin"] not in state["files"] and LAUNCHER_MARK.encode() not in existing \
            and not force:
        raise InstallError(f"{paths.bin} exists and is not a corepipe launcher; remove it, choose another --bin "
                           "or use --force")
    try:
        cfg = configuration.load(paths.config) if os.path.exists(paths.config) else configuration.Config()
    except configuration.ConfigError as exc:
        raise InstallError(f"{exc}; fix the config or remove it") from None
    state["store"] = _check_store(store or cfg.store)
    if old is not None and old["store"] == state["store"]:
        state["store_created"] = old["store_created"]

    changes = _Changes(state)
    try:
        _apply(paths, state, changes, python, forwarder, sysctl, current, current_limit)
    except BaseException:
        changes.rollback()
        raise
    lines = changes.done or ["already installed; nothing changed"]
    lines += [f"kernel.core_pattern = {pattern}", f"kernel.core_pipe_limit = {PIPE_LIMIT}",
              f"store: {state['store']}",
              f"handler: the static forwarder {paths.forwarder}, the launcher {state['bin']} when serve does not take "
              "a crash" if forwarder is not None else f"handler: the Python launcher {state['bin']} ({why_not})",
              f"previous kernel.core_pattern (restored by uninstall): {state['previous'][CORE_PATTERN]!r}"]
    if mode == SOCKET:
        lines.append(f"mode: socket: 'corepipe serve --socket {socket_path}' switches the kernel to "
                     f"{socket_pattern(state)} while it runs (corepipe.socket/.service where systemd runs); "
                     "the pipe handler above collects whenever it does not")
    else:
        lines.append("mode: pipe: while 'corepipe serve' runs (corepipe.service where systemd runs) the handler "
                     "hands each crash to it; the handler collects whenever it does not")
    if asked == "auto" and "socket" in coredump_socket.core_modes(paths.proc_sys):
        kept = (old or {}).get("mode") == mode
        lines.append(f"auto kept the installed {mode} mode ({AUTO_FASTER})" if kept else AUTO_PIPE if mode == PIPE
                     else f"auto picked socket mode: no static forwarder was built ({AUTO_FASTER})")
    return lines


def socket_pattern(state: dict) -> Optional[str]:
    """The pattern a running server of this installation writes, if it is in socket mode."""
    if state.get("mode") != SOCKET or not state.get("socket"):
        return None
    return coredump_socket.pattern(state["socket"])


def _static_forwarder(paths: Paths, old: Optional[dict], forward_socket: str, force: bool) -> tuple:
    """The static forwarder's executable and None, or None and why the launcher is the pattern's program."""
    if _read(paths.forwarder) is not None and paths.forwarder not in (old or {}).get("files", {}) and not force:
        return None, f"{paths.forwarder} exists and is not corepipe's; remove it or use --force"
    try:
        return static_forwarder.build(forward_socket, os.path.abspath(paths.bin)), None
    except static_forwarder.NotBuilt as exc:
        return None, f"the static forwarder was not built: {exc}"


def _apply(paths: Paths, state: dict, changes: _Changes, python: str, forwarder: Optional[bytes],
           sysctl: Sysctl, current: str, current_limit: str) -> None:
    created: list = []
    changes.undo.append(lambda: [_rmdir(d) for d in reversed(created)])
    for directory in (os.path.dirname(state["bin"]), os.path.dirname(state["config"]), paths.sysctl_dir,
                      os.path.dirname(state["store"])):
        _makedirs(directory, created)
    state["dirs"] += [d for d in created if d not in state["dirs"]]

    changes.file(state["bin"], launcher_text(python, state["forward_socket"]).encode(), 0o755, "launcher")
    _check_launcher(state["bin"])
    if forwarder is not None:
        changes.file(paths.forwarder, forwarder, 0o755, "static forwarder")
    # A config of the user's is kept as it is, but for its store (configuration.installed_text).
    existing = _read(paths.config)
    text = configuration.installed_text(None if existing is None else existing.decode(), state["store"])
    mode = 0o644 if existing is None else os.stat(paths.config).st_mode & 0o7777
    changes.file(state["config"], text.encode(), mode, "config")
    if not os.path.isdir(state["store"]):
        from corepipe.platform.store import Store

        Store(state["store"]).close()
        state["store_created"] = True
        changes.undo.append(lambda: shutil.rmtree(state["store"]))
        changes.done.append(f"created the store {state['store']}")

    if current_limit != str(PIPE_LIMIT):
        changes.undo.append(lambda: sysctl.write(CORE_PIPE_LIMIT, current_limit))
        _kernel_write(sysctl, CORE_PIPE_LIMIT, str(PIPE_LIMIT))
        changes.done.append(f"set kernel.core_pipe_limit = {PIPE_LIMIT} (was {current_limit})")
    if current != state["pattern"] and current != socket_pattern(state):  # a running server keeps its socket
        changes.undo.append(lambda: sysctl.write(CORE_PATTERN, current))
        _kernel_write(sysctl, CORE_PATTERN, state["pattern"])
        changes.done.append(f"set kernel.core_pattern (was {current!r})")
    changes.file(paths.dropin, dropin_text(state["pattern"], PIPE_LIMIT).encode(), 0o644, "sysctl drop-in")

    data = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
    if _read(paths.state) != data:
        _write_file(paths.state, data, 0o600)


def _kernel_write(sysctl: Sysctl, name: str, value: str) -> None:
    try:
        sysctl.write(name, value)
    except SysctlError as exc:
        raise InstallError(f"{exc}; nothing was changed") from None


def _check_launcher(path: str) -> None:
    """Run the launcher the way the kernel will: empty environment, cwd /."""
    try:
        proc = subprocess.run([path, "--version"], env={}, cwd="/", capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise InstallError(f"the launcher {path} cannot run: {exc.strerror}; is its file system mounted noexec?") \
            from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InstallError(f"the launcher {path} fails with an empty environment: {last}")


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def uninstall(paths: Paths, purge: bool = False, force: bool = False) -> list:
    """Put back what install saved and remove what it created; returns the lines to print."""
    state = load_state(paths.state)
    if state is None:
        raise InstallError(f"not installed: no install state at {paths.state} (installed with another --config?)")
    sysctl = Sysctl(paths.proc_sys)
    lines = []
    try:
        sysctl.check_writable(CORE_PATTERN, CORE_PIPE_LIMIT)
        current = sysctl.read(CORE_PATTERN)
        previous = state["previous"]
        if current in (state["pattern"], socket_pattern(state)) or force:
            sysctl.write(CORE_PIPE_LIMIT, previous[CORE_PIPE_LIMIT])
            sysctl.write(CORE_PATTERN, previous[CORE_PATTERN])
            lines.append(f"restored kernel.core_pattern = {previous[CORE_PATTERN]!r}, "
                         f"kernel.core_pipe_limit = {previous[CORE_PIPE_LIMIT]}")
        else:
            lines.append(f"kernel.core_pattern was changed since install to {current!r}; left as it is "
                         f"(--force restores {previous[CORE_PATTERN]!r})")
    except SysctlError as exc:
        raise InstallError(f"{exc}; the install state is kept: fix that and run uninstall again") from None
    for path, saved in state["files"].items():
        _restore_file(path, saved)
        lines.append(f"{'removed' if saved is None else 'restored'} {path}")
    if socket_pattern(state) is not None:
        lines.append("socket mode: stop 'corepipe serve' (systemctl disable --now corepipe.socket corepipe.service); "
                     "it leaves the restored pattern alone")
    else:
        lines.append("pipe mode: stop 'corepipe serve' if it runs (systemctl disable --now corepipe-forward.socket "
                     "corepipe.service)")
    if purge:
        lines.append(prune.purge(state["store"], state["store_created"]))
    else:
        lines.append(f"kept the store {state['store']} (--purge deletes it)")
    os.unlink(paths.state)
    for directory in sorted(state["dirs"], key=len, reverse=True):
        _rmdir(directory)
    return lines
