"""The store's accounting, shared by every handler running at the same time and by ``corepipe prune``.

One lock file (``<store>/.lock``, flock) serialises every decision: read what the store holds,
apply the policy (policy.py), delete what it says, reserve room for the core about to be
written, and remember recent cores for the crash-loop rate limits in ``<store>/.state.json``.
The lock is held only while deciding, never while a core is written. Nothing under the store
is followed if it is a link; a lock or state file that is not a plain file is replaced.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Optional

from corepipe.domain import catalog, policy, record
from corepipe.domain.snapshot import parse_start_ticks
from corepipe.platform.config import Config
from corepipe.platform.log import ERR, log
from corepipe.platform.store import CORE, RECORD, CrashDir, Store, StoreError, open_dir

LOCK = ".lock"
STATE = ".state.json"
PARTIAL_CORE = "core.partial.zst"
CORE_FILES = (CORE, PARTIAL_CORE)
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_STATE_MAX = 4 << 20
#: Below this many bytes of room a core is not even attempted.
MIN_BUDGET = 4096


def crash_time(name: str) -> float:
    """The dump time in a crash directory's name (``<UTC time>-<id>``)."""
    try:
        return float(calendar.timegm(time.strptime(name.split("-", 1)[0], "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return 0.0


def _self_start() -> Optional[int]:
    with open("/proc/self/stat", "rb") as f:
        return parse_start_ticks(f.read(4096))


def _alive(pid: int, start: Optional[int]) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            return parse_start_ticks(f.read(4096)) == start
    except (OSError, ValueError, TypeError):
        return False


@dataclass
class Temp:
    """A hidden temporary file left in a crash directory (a handler still writing, or killed)."""

    group: str
    crash: str
    name: str
    mtime: float


@dataclass
class Contents:
    crashes: list = field(default_factory=list)  # policy.Core, one per crash directory
    temps: list = field(default_factory=list)


class Accounting:
    """The store's lock, held for a ``with`` block."""

    def __init__(self, store: Store):
        self.store = store
        self.fd = self._open_lock()

    def _open_lock(self) -> int:
        for _ in range(4):
            try:
                fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                             dir_fd=self.store.fd)
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    fd = os.open(LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=self.store.fd)
                elif exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    self._remove_planted(LOCK)
                    continue
                else:
                    raise
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
                return fd
            os.close(fd)
            self._remove_planted(LOCK)
        raise StoreError(errno.EPERM, f"{self.store.root}/{LOCK} keeps being replaced; not using the store")

    def _remove_planted(self, name: str) -> None:
        log(f"error: {self.store.root}/{name} is not a plain file of ours; replacing it", ERR)
        try:
            os.unlink(name, dir_fd=self.store.fd)
        except IsADirectoryError:
            os.rmdir(name, dir_fd=self.store.fd)

    def __enter__(self) -> Accounting:
        for _ in range(8):
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            # Locked, but is it still the lock file? (Another handler may have just replaced a planted one.)
            try:
                current = os.stat(LOCK, dir_fd=self.store.fd, follow_symlinks=False)
            except OSError:
                current = None
            mine = os.fstat(self.fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return self
            os.close(self.fd)
            self.fd = self._open_lock()
        raise StoreError(errno.EPERM, f"{self.store.root}/{LOCK} keeps being replaced; not using the store")

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

    # -- the state file: rate-limit history and reservations --------------------------------------------

    def load_state(self) -> dict:
        try:
            fd = os.open(STATE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.store.fd)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log(f"error: {self.store.root}/{STATE}: {exc.strerror}; starting a new one", ERR)
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > _STATE_MAX:
                log(f"error: {self.store.root}/{STATE} is not a plain file of ours; starting a new one", ERR)
                return {}
            return _valid_state(json.loads(os.read(fd, _STATE_MAX)))
        except (OSError, ValueError) as exc:
            log(f"error: {self.store.root}/{STATE} unreadable ({exc}); starting a new one", ERR)
            return {}
        finally:
            os.close(fd)

    def save_state(self, state: dict) -> None:
        # Written like any store file: hidden temporary, fsync, rename over whatever is there (never through it).
        CrashDir(self.store.fd, self.store.root, "").write(STATE, json.dumps(state).encode())

    def reservations(self, state: dict, max_age: float) -> dict:
        """Room promised to handlers still writing; entries of dead or overdue handlers are dropped."""
        now = time.time()
        live = {}
        for crash_id, entry in (state.get("reservations") or {}).items():
            try:
                size, pid, start, when = entry
                if now - when < max_age and _alive(pid, start):
                    live[crash_id] = entry
            except (TypeError, ValueError):
                continue
        state["reservations"] = live
        return live

    def release(self, crash_id: str) -> None:
        """The core is in place (or given up): its reservation is no longer needed."""
        state = self.load_state()
        if (state.get("reservations") or {}).pop(crash_id, None) is not None:
            self.save_state(state)

    # -- what the store holds ---------------------------------------------------------------------------

    def scan(self) -> Contents:
        """Every crash directory and leftover temporary file, without following any link."""
        contents = Contents()
        for parent_fd, parts in catalog.crash_dirs(self.store.fd, self.store.root, None):
            crash_fd = self._open(parent_fd, parts[-1])
            if crash_fd is None:
                continue
            try:
                contents.crashes.append(self._crash(crash_fd, "/".join(parts[:-1]), parts[-1], contents))
            finally:
                os.close(crash_fd)
        return contents

    def _crash(self, fd: int, group: str, crash: str, contents: Contents) -> policy.Core:
        """A crash's time is when its core was written (crashes in the same second keep their order),
        or the dump time in its name when it has no core."""
        core, size, when = None, 0, crash_time(crash)
        for name in os.listdir(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if name in CORE_FILES:
                core, size, when = name, st.st_blocks * 512, st.st_mtime
            elif TEMP_NAME.fullmatch(name):
                contents.temps.append(Temp(group, crash, name, st.st_mtime))
        return policy.Core(group=group, crash=crash, size=size, time=when, file=core)

    def _open(self, parent: int, name: str) -> Optional[int]:
        try:
            return open_dir(parent, name, create=False)
        except OSError as exc:
            log(f"error: store {self.store.root}: skipping {name}: {exc}", ERR)
            return None

    def _open_path(self, components: list) -> int:
        """An fd on store/<components...>, each opened without following links."""
        fd = self.store.fd
        for component in components:
            child = open_dir(fd, component, create=False)
            if fd != self.store.fd:
                os.close(fd)
            fd = child
        return fd

    def _open_crash(self, group: str, crash: str) -> CrashDir:
        return CrashDir(self._open_path(group.split("/") + [crash]), f"{self.store.root}/{group}/{crash}", crash)

    # -- deleting ---------------------------------------------------------------------------------------

    def delete_core(self, core: policy.Core, reason: str) -> None:
        """Delete a crash's core and say so in its record (which stays)."""
        crash = self._open_crash(core.group, core.crash)
        try:
            os.unlink(core.file, dir_fd=crash.fd)
            try:
                rec = catalog.read_record(crash.fd)
                rec["core"].update(stored=False, file=None, reason=f"deleted: {reason}")
                crash.write(RECORD, record.dumps(rec))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log(f"error: {crash.path}: core deleted but its record not updated: {exc}", ERR)
        finally:
            crash.close()

    def delete_crash(self, entry: policy.Core) -> None:
        """Delete a whole crash directory (its files are never followed)."""
        crash = self._open_crash(entry.group, entry.crash)
        try:
            for name in os.listdir(crash.fd):
                try:
                    os.unlink(name, dir_fd=crash.fd)
                except IsADirectoryError:
                    pass
        finally:
            crash.close()
        parent_fd = self._open_path(entry.group.split("/"))
        try:
            os.rmdir(entry.crash, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    def delete_temp(self, temp: Temp) -> None:
        crash = self._open_crash(temp.group, temp.crash)
        try:
            os.unlink(temp.name, dir_fd=crash.fd)
        finally:
            crash.close()


def measure(store: Store, cfg: Config) -> tuple:
    """(the effective policy.Limits, bytes free) for the store's filesystem as it is now."""
    st = os.fstatvfs(store.fd)
    lim = policy.limits(max_use=cfg.max_use, keep_free=cfg.keep_free, fs_size=st.f_blocks * st.f_frsize,
                        container_max_cores=cfg.container_max_cores, container_max_bytes=cfg.container_max_bytes)
    return lim, st.f_bavail * st.f_frsize


def _valid_state(state: object) -> dict:
    """The parts of a loaded state that have the right shape (a damaged file must not stop a handler)."""
    if not isinstance(state, dict):
        return {}
    rates = state.get("rate")
    reservations = state.get("reservations")
    signatures = state.get("signatures")
    return {"rate": {k: v for k, v in rates.items() if isinstance(v, list)} if isinstance(rates, dict) else {},
            "reservations": reservations if isinstance(reservations, dict) else {},
            "signatures": ({k: v for k, v in signatures.items() if isinstance(v, (int, float))}
                           if isinstance(signatures, dict) else {})}


def rate_keys(group: tuple, exe: str) -> list:
    """The rate-limit keys of a crash: its container, and its executable within that container."""
    where = "/".join(group)
    return [("container", f"container:{where}"),
            ("executable", f"exe:{where}:{hashlib.sha256(exe.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}")]


@dataclass
class Admission:
    #: Compressed bytes reserved for the core (0: do not store it) and, when 0 or limited, why.
    budget: int = 0
    reason: Optional[str] = None
    limited_by: Optional[str] = None


#: The first reservation at most; a core that needs more asks again (``grow``) and then gets half as much
#: again as it needs (at least GROW_STEP more), so that a big core asks only a few times.
FIRST_RESERVATION = 1 << 20
GROW_STEP = 8 << 20


def admit(store: Store, cfg: Config, *, crash_id: str, group: tuple, exe: str, want: Optional[int],
          signature: Optional[str] = None) -> Admission:
    """Decide under the lock whether this crash's core is stored, make room for ``want`` bytes, reserve it.
    ``signature`` (the crash site's, known before the core is read) is limited across all containers."""
    now = time.time()
    with Accounting(store) as acc:
        state = acc.load_state()
        rates = state.setdefault("rate", {})
        keys = rate_keys(group, exe) + ([("signature", f"signature:{signature}")] if signature else [])
        limits_by_key = {"container": (cfg.rate_limit_container, cfg.rate_limit_window),
                         "executable": (cfg.rate_limit_exe, cfg.rate_limit_window),
                         "signature": (cfg.signature_max_cores, cfg.signature_window)}
        for what, key in keys:
            limit, window = limits_by_key[what]
            allowed, recent = policy.rate_allows(rates.get(key, []), now=now, window=window, limit=limit)
            rates[key] = recent
            if not allowed:
                _forget_idle(rates)
                acc.save_state(state)
                return Admission(reason=f"rate limited: {len(recent)} cores of this {what} in the last "
                                        f"{window} s (limit {limit})")
        want = min(want or FIRST_RESERVATION, FIRST_RESERVATION)
        budget, limited_by = _reserve(acc, state, cfg, crash_id, group, want, written=0)
        if budget < MIN_BUDGET:
            state["reservations"].pop(crash_id, None)
            acc.save_state(state)
            return Admission(reason=f"no room for the core: {limited_by} leaves {budget} bytes",
                             limited_by=limited_by)
        for _what, key in keys:
            rates[key].append(now)
        _forget_idle(rates)
        acc.save_state(state)
        return Admission(budget=budget, limited_by=limited_by)


def grow(store: Store, cfg: Config, *, crash_id: str, group: tuple, needed: int, written: int) -> int:
    """A core outgrew its reservation: make room for ``needed`` bytes in all (``written`` of them already
    on disk); returns the new reservation, less than ``needed`` when no more room could be made."""
    with Accounting(store) as acc:
        state = acc.load_state()
        budget, _ = _reserve(acc, state, cfg, crash_id, group, needed, written=written,
                             extra=max(needed // 2, GROW_STEP))
        acc.save_state(state)
        return budget


def _reserve(acc: Accounting, state: dict, cfg: Config, crash_id: str, group: tuple, want: int,
             written: int, extra: int = 0) -> tuple:
    """Apply the policy for ``want`` bytes (``written`` of them already on disk), delete what it says,
    and reserve ``want`` plus up to ``extra`` more where there is room without deleting anything more;
    returns (reserved bytes, the limit that decided)."""
    reserved = acc.reservations(state, cfg.timeout + 60)
    reserved.pop(crash_id, None)
    lim, fs_free = measure(acc.store, cfg)
    plan = policy.plan(acc.scan().crashes, lim, fs_free=fs_free + written,
                       reserved=sum(r[0] for r in reserved.values()), group="/".join(group), want=want)
    for core, reason in plan.delete:
        try:
            acc.delete_core(core, f"{reason} (room for crash {crash_id})")
            log(f"deleted the core of {core.group}/{core.crash}: {reason}")
        except OSError as exc:
            log(f"error: cannot delete the core of {core.group}/{core.crash}: {exc}", ERR)
    budget = min(want + extra, plan.budget)
    reserved[crash_id] = [budget, os.getpid(), _self_start(), time.time()]
    return budget, plan.limited_by


def _forget_idle(rates: dict) -> None:
    for key in [k for k, v in rates.items() if not v]:
        del rates[key]
