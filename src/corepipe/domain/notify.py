"""The notification hook: a command run for each new signature, with the final record on stdin.

"New" means the crash's policy group has not had the signature's hash before (nor, for a crash without a
backtrace, its crash site): per group, so that a user who crashes a system program first does not take
root's or a container's notification for it. It is decided under the store's lock with the hashes
kept in the state file (books.Books, state.py; at most MAX_SEEN, the oldest forgotten first), and so is
the rate limit: at most ``notify_rate_limit`` notifications per policy group within ``notify_rate_window`` (a
user who crashes a new program every second notifies a few times; the rest are counted in the group's
``notifications_suppressed`` counter). The command runs after the record is final,
so after the kernel has let the crashed process go: as a uid that no process, account or group has
(platform/sandbox.py's ``free_uid``), or ``notify_user`` if set (an account of its own: never root or the
shared ``nobody``, whose other processes could take the hook's fds with pidfd_getfd), without the handler's
groups, in a session of its own, with an empty environment but PATH. Its stdin is a sealed memory file
holding the record: nothing can change it, and no other user can reach it. Its whole session is killed at
``notify_timeout``. What happened is returned for the record (``notify``) and logged. Every field of the
record is text the crashed process chose: the hook must treat it so.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from typing import Optional

from corepipe.domain import policy, record
from corepipe.domain.books import Books
from corepipe.platform import sandbox
from corepipe.platform.config import Config
from corepipe.platform.fs import sealed_memfd
from corepipe.platform.log import ERR, INFO, log
from corepipe.platform.store import Store

MAX_SEEN = 10000
_PATH = "/usr/local/bin:/usr/bin:/bin"


def decide(store: Store, sig: dict, group: tuple, cfg: Config) -> tuple:
    """(whether ``sig``, a record's ``signature``, is new to the policy group ``group``; why its notification is
    not sent, or None). Remembers the signature either way, and a notification sent in the group's rate key."""
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
        held = None
        if new:
            rates, key = books.state.rate, f"notify:{where}"
            allowed, recent = policy.rate_allows(rates.get(key, []), now=now, window=cfg.notify_rate_window,
                                                 limit=cfg.notify_rate_limit)
            rates[key] = recent + ([now] if allowed else [])
            if not allowed:
                total = books.state.count(where, "notifications_suppressed")
                held = (f"rate limited: {len(recent)} notifications of this policy group in the last "
                        f"{cfg.notify_rate_window} s (notify_rate_limit {cfg.notify_rate_limit}); "
                        f"{total} suppressed in this group so far")
    return new, held


def _account(cfg: Config) -> tuple:
    """(uid, gid, what the record calls it) the hook runs as; ValueError says why it may not run."""
    if not cfg.notify_user:
        uid = sandbox.free_uid()
        return uid, uid, f"uid {uid} (one-off)"
    try:
        user = pwd.getpwnam(cfg.notify_user)
    except KeyError:
        raise ValueError(f"no user {cfg.notify_user!r} (config notify_user)") from None
    if 0 in (user.pw_uid, user.pw_gid) or 65534 in (user.pw_uid, user.pw_gid):
        raise ValueError(f"notify_user {cfg.notify_user!r} is root or the shared nobody: not run")
    return user.pw_uid, user.pw_gid, cfg.notify_user


def run(rec: dict, cfg: Config) -> dict:
    """Run the hook for ``rec``; ``{user, exit_status, error, duration}``."""
    result: dict = {"user": cfg.notify_user, "exit_status": None, "error": None, "duration": None}
    started = time.monotonic()
    try:
        uid, gid, result["user"] = _account(cfg)
        stdin = sealed_memfd("corepipe-record", record.dumps(rec))
    except (ValueError, OSError) as exc:
        result["error"] = str(exc)
        return result
    try:
        proc = subprocess.Popen(cfg.notify_command, stdin=stdin, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd="/", start_new_session=True, user=uid,
                                group=gid, extra_groups=[], close_fds=True,
                                env={"PATH": _PATH, "HOME": "/nonexistent", "LC_ALL": "C"})
    except OSError as exc:
        result["error"] = f"cannot run {cfg.notify_command[0]!r}: {exc.strerror or exc}"
        return result
    finally:
        os.close(stdin)
    try:
        result["exit_status"] = proc.wait(cfg.notify_timeout)
    except subprocess.TimeoutExpired:
        result["error"] = f"timed out after {cfg.notify_timeout} s (notify_timeout); killed"
    finally:
        _kill_session(proc)
        result["duration"] = round(time.monotonic() - started, 3)
    if result["exit_status"]:
        result["error"] = f"exited with status {result['exit_status']}"
    return result


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
    if not cfg.notify_command or not sig:
        return None
    new, held = decide(store, sig, group, cfg)
    if not new:
        return None
    if held:
        log(f"pid {rec.get('pid')}: new signature {sig['hash']}: no notification: {held}", INFO)
        return {"user": None, "exit_status": None, "error": None, "duration": None, "suppressed": held}
    result = run(rec, cfg)
    if result["error"]:
        log(f"error: pid {rec.get('pid')}: notify_command for new signature {sig['hash']}: {result['error']}", ERR)
    else:
        log(f"pid {rec.get('pid')}: new signature {sig['hash']}: notify_command ran as {result['user']}", INFO)
    return result
