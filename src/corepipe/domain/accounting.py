"""Admission: whether a crash's core is stored and how much room it may take, for every handler at once.

Under the store lock (books.Books) each handler reads what the store holds from the ledger
(ledger.py: no rescan, whatever the store's size), applies the policy (policy.py), deletes what it
says (books), reserves room for the core about to be written, and remembers recent cores for the
crash-loop rate limits in the state file (state.py). The lock is held only while deciding, never
while a core is written.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Optional

from corepipe.domain import policy
from corepipe.domain.books import Books
from corepipe.domain.state import Reservation, State
from corepipe.platform import fs, procfs
from corepipe.platform.config import Config
from corepipe.platform.log import ERR, log
from corepipe.platform.store import Store

#: Below this many bytes of room a core is not even attempted.
MIN_BUDGET = 4096


def _self_start() -> Optional[int]:
    return procfs.started("self")


def _alive(pid: int, start: Optional[int]) -> bool:
    try:
        return procfs.started(int(pid)) == start
    except (OSError, ValueError, TypeError):
        return False


def reservations(state: State, max_age: float) -> dict:
    """Room promised to handlers still writing (crash id -> Reservation); those of dead or overdue handlers are
    dropped."""
    now = time.time()
    state.reservations = {crash_id: r for crash_id, r in state.reservations.items()
                          if now - r.when < max_age and _alive(r.pid, r.start)}
    return state.reservations


def release(books: Books, crash_id: str) -> None:
    """The core is in place (or given up): its reservation is no longer needed. The caller holds ``books``."""
    books.state.reservations.pop(crash_id, None)


def measure(store: Store, cfg: Config, lim: Optional[policy.Limits] = None) -> tuple:
    """(the effective policy.Limits, bytes free) for the store's filesystem as it is now: one statvfs. ``lim``:
    the limits a crash has from its first measurement (they follow from the config and the filesystem's size,
    which do not change under it); only the free space, which other handlers' writes and its own change, is
    measured anew."""
    size, free = fs.space(store.fd)
    if lim is None:
        lim = policy.limits(max_use=cfg.max_use, keep_free=cfg.keep_free, fs_size=size,
                            container_max_cores=cfg.container_max_cores, container_max_bytes=cfg.container_max_bytes)
    return lim, free


def rate_keys(group: tuple, exe: str, signature: Optional[str] = None) -> list:
    """The rate-limit keys of a crash: its container, its executable and (if known) its crash-site signature
    within that container. All within the policy group: a user who crashes a system program first must not
    spend another group's cores of that signature."""
    where = "/".join(group)
    return [("container", f"container:{where}"),
            ("executable", f"exe:{where}:{hashlib.sha256(exe.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"),
            *([("signature", f"signature:{where}:{signature}")] if signature else [])]


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
          signature: Optional[str] = None, lim: Optional[policy.Limits] = None) -> Admission:
    """Decide under the lock whether this crash's core is stored, make room for ``want`` bytes, reserve it.
    ``signature`` (the crash site's, known before the core is read) is limited within ``group``; ``lim``: the
    crash's limits (``measure``), the free space is measured under the lock."""
    now = time.time()
    with Books(store) as books:
        rates = books.state.rate
        keys = rate_keys(group, exe, signature)
        reason = _over_rate(rates, keys, cfg, now)
        if reason is not None:
            _forget_idle(rates)
            return Admission(reason=reason)
        want = min(want or FIRST_RESERVATION, FIRST_RESERVATION)
        budget, limited_by = _reserve(books, cfg, crash_id, group, want, written=0, lim=lim)
        if budget < MIN_BUDGET:
            release(books, crash_id)
            return Admission(reason=_no_room(limited_by, budget), limited_by=limited_by)
        for _what, key in keys:
            rates[key].append(now)
        _forget_idle(rates)
        return Admission(budget=budget, limited_by=limited_by)


def refusal(store: Store, cfg: Config, *, group: tuple, exe: str) -> Optional[str]:
    """Why ``admit`` would refuse a crash of ``exe`` in ``group`` a core now (its reason: the rate limits, or
    no room even after deleting what the policy allows), or None. It deletes, reserves and records nothing:
    the socket server asks before the dump (a refusal is a REJECT: the kernel writes nothing), ``admit``
    decides after, for the FIRST_RESERVATION it would ask then. Nor does it save a ledger it had to rebuild."""
    with Books(store, save=False) as books:
        reason = _over_rate(books.state.rate, rate_keys(group, exe), cfg, time.time())
        if reason is not None:
            return reason
        plan = _plan(books, cfg, None, group, FIRST_RESERVATION, written=0)
        return _no_room(plan.limited_by, plan.budget) if plan.budget < MIN_BUDGET else None


def record_refusal(books: Books, cfg: Config, group: str, size: int,
                   lim: Optional[policy.Limits] = None) -> Optional[str]:
    """Why a crash without a core gets no record of ``size`` bytes in ``group`` (its records would go over
    ``records_max_use``, or the filesystem below keep_free), or None. The caller holds ``books``; nothing is
    deleted for a record. ``lim``: the crash's limits (``measure``); the free space is measured now."""
    lim, fs_free = measure(books.store, cfg, lim)
    budget = policy.records_budget(cfg.records_max_use, lim)
    used = books.checked(lambda: books.ledger.group_records(group))[1]
    if budget and used + size > budget:
        return f"the records of {group} are over records_max_use ({budget} bytes)"
    if lim.keep_free and fs_free - size < lim.keep_free:
        return f"the filesystem has less than keep_free ({lim.keep_free} bytes) free"
    return None


def _no_room(limited_by: Optional[str], budget: int) -> str:
    return f"no room for the core: {limited_by} leaves {budget} bytes"


def _over_rate(rates: dict, keys: list, cfg: Config, now: float) -> Optional[str]:
    """The first rate limit ``keys`` are over (their histories in ``rates`` trimmed to the window), or None."""
    limits_by_key = {"container": (cfg.rate_limit_container, cfg.rate_limit_window),
                     "executable": (cfg.rate_limit_exe, cfg.rate_limit_window),
                     "signature": (cfg.signature_max_cores, cfg.signature_window)}
    for what, key in keys:
        limit, window = limits_by_key[what]
        allowed, recent = policy.rate_allows(rates.get(key, []), now=now, window=window, limit=limit)
        rates[key] = recent
        if not allowed:
            return f"rate limited: {len(recent)} cores of this {what} in the last {window} s (limit {limit})"
    return None


def grow(store: Store, cfg: Config, *, crash_id: str, group: tuple, needed: int, written: int,
         lim: Optional[policy.Limits] = None) -> int:
    """A core outgrew its reservation: make room for ``needed`` bytes in all (``written`` of them already
    on disk: the free space is measured anew, ``lim`` the crash's limits); returns the new reservation, less
    than ``needed`` when no more room could be made."""
    with Books(store) as books:
        budget, _ = _reserve(books, cfg, crash_id, group, needed, written=written, extra=max(needed // 2, GROW_STEP),
                             lim=lim)
        return budget


def _reserve(books: Books, cfg: Config, crash_id: str, group: tuple, want: int, written: int,
             extra: int = 0, lim: Optional[policy.Limits] = None) -> tuple:
    """Apply the policy for ``want`` bytes (``written`` of them already on disk), delete what it says,
    and reserve ``want`` plus up to ``extra`` more where there is room without deleting anything more;
    returns (reserved bytes, the limit that decided)."""
    plan = _plan(books, cfg, crash_id, group, want, written, lim)
    for core, reason in plan.delete:
        try:
            books.delete_core(core, f"{reason} (room for crash {crash_id})")
            log(f"deleted the core of {core.group}/{core.crash}: {reason}")
        except OSError as exc:
            log(f"error: cannot delete the core of {core.group}/{core.crash}: {exc}", ERR)
    budget = min(want + extra, plan.budget)
    books.state.reservations[crash_id] = Reservation(budget, os.getpid(), _self_start(), time.time())
    return budget, plan.limited_by


def _plan(books: Books, cfg: Config, crash_id: Optional[str], group: tuple, want: int,
          written: int, lim: Optional[policy.Limits] = None) -> policy.Plan:
    """The policy's plan for ``want`` more bytes in ``group`` (``written`` of them on disk already), counting
    the room promised to the other live handlers (``crash_id``'s own promise aside); deletes nothing."""
    reserved = reservations(books.state, cfg.timeout + 60)
    lim, fs_free = measure(books.store, cfg, lim)
    return books.checked(lambda: policy.plan(books.ledger, lim, fs_free=fs_free + written,
                                             reserved=sum(r.size for k, r in reserved.items() if k != crash_id),
                                             group="/".join(group), want=want))


def _forget_idle(rates: dict) -> None:
    for key in [k for k, v in rates.items() if not v]:
        del rates[key]
