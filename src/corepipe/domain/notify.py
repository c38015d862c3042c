"""The notification hook: a command run for each new signature, with the final record on stdin.

"New" means the crash's policy group has not had the signature's hash before (nor, for a crash without a
backtrace, its crash site): per group, so that a user who crashes a system program first does not take
root's or a container's notification for it. It is decided under the store's lock with the hashes
kept in the state file (books.Books, state.py; at most MAX_SEEN, the oldest forgotten first). The command
runs after the record is final, so after the kernel has let the crashed process go: as ``notify_user`` (never root:
refused), without the handler's groups, in a session of its own, with an empty environment but PATH,
and its whole session is killed at ``notify_timeout``. What happened is returned for the record (``notify``) and logged.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from typing import Optional

from corepipe.domain import record
from corepipe.domain.books import Books
from corepipe.platform.config import Config
from corepipe.platform.log import ERR, INFO, log
from corepipe.platform.store import Store

MAX_SEEN = 10000
_PATH = "/usr/local/bin:/usr/bin:/bin"


def is_new(store: Store, sig: dict, group: tuple) -> bool:
    """Whether ``sig`` (a record's ``signature``) is new to the policy group ``group``; remembers it either way."""
    where = "/".join(group)
    site = f"{where} site:{sig.get('site')}" if sig.get("site") else None
    known = f"{where} {sig['hash']}"
    with Books(store) as books:
        seen = books.state.signatures
        new = known not in seen and not (sig.get("source") == "crash site" and site in seen)
        now = time.time()
        seen[known] = now
        if site and sig.get("source") == "backtrace":
            seen[site] = now  # later crashes of this site without a backtrace are not new
        for old in sorted(seen, key=seen.get)[:max(0, len(seen) - MAX_SEEN)]:
            del seen[old]
    return new


def run(rec: dict, cfg: Config) -> dict:
    """Run the hook for ``rec``; ``{user, exit_status, error, duration}``."""
    result: dict = {"user": cfg.notify_user, "exit_status": None, "error": None, "duration": None}
    started = time.monotonic()
    try:
        user = pwd.getpwnam(cfg.notify_user)
    except KeyError:
        result["error"] = f"no user {cfg.notify_user!r} (config notify_user)"
        return result
    if user.pw_uid == 0 or user.pw_gid == 0:
        result["error"] = f"notify_user {cfg.notify_user!r} is root or in group root: not run"
        return result
    try:
        proc = subprocess.Popen(cfg.notify_command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd="/", start_new_session=True, user=user.pw_uid,
                                group=user.pw_gid, extra_groups=[], close_fds=True,
                                env={"PATH": _PATH, "HOME": "/nonexistent", "LC_ALL": "C"})
    except OSError as exc:
        result["error"] = f"cannot run {cfg.notify_command[0]!r}: {exc.strerror or exc}"
        return result
    try:
        result["exit_status"] = _feed(proc, record.dumps(rec), cfg.notify_timeout)
    except subprocess.TimeoutExpired:
        result["error"] = f"timed out after {cfg.notify_timeout} s (notify_timeout); killed"
    finally:
        _kill_session(proc)
        result["duration"] = round(time.monotonic() - started, 3)
    if result["exit_status"]:
        result["error"] = f"exited with status {result['exit_status']}"
    return result


def _feed(proc: subprocess.Popen, data: bytes, timeout: int) -> Optional[int]:
    try:
        proc.communicate(data, timeout=timeout)
    except BrokenPipeError:  # the hook need not read its stdin
        proc.wait(timeout)
    return proc.returncode


def _kill_session(proc: subprocess.Popen) -> None:
    """The hook's whole session goes, also what it left running in the background."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def after_collection(store: Store, rec: dict, cfg: Config, group: tuple) -> Optional[dict]:
    """The hook for a collected crash whose signature is new to its policy group ``group``; None when it is not
    run."""
    sig = rec.get("signature")
    if not cfg.notify_command or not sig or not is_new(store, sig, group):
        return None
    result = run(rec, cfg)
    if result["error"]:
        log(f"error: pid {rec.get('pid')}: notify_command for new signature {sig['hash']}: {result['error']}", ERR)
    else:
        log(f"pid {rec.get('pid')}: new signature {sig['hash']}: notify_command ran as {cfg.notify_user}", INFO)
    return result
