"""A crash's core file: the kernel's stream (after what capture read of it) compressed into the crash directory
within the storage policy's budget, under a temporary name until the pipeline commits it under the store's lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from corepipe.domain import accounting, record
from corepipe.domain.context import Context
from corepipe.platform import affinity
from corepipe.platform.capture import Timeout
from corepipe.platform.log import ERR, log
from corepipe.platform.store import CORE, PARTIAL_CORE


@dataclass
class Staged:
    """A core written under a temporary name in the crash directory, waiting for ``commit``."""

    fd: int
    tmp: str
    name: str


def write(ctx: Context, admission: accounting.Admission, limit: Optional[int], cap: Optional[int],
          slot: Optional[int] = None) -> Optional[Staged]:
    """The captured prefix and the rest of the core fd, compressed into a temporary file; None when nothing
    is to be committed (refused for room, or failed: the record says which). ``slot``: the core slot held
    (slots.py), which picks the CPU the stream shares with the dumping thread."""
    from corepipe.platform import compress, elf  # not before a core is to be read: the handler starts lean

    rec, crash, cfg, group = ctx.record, ctx.crash, ctx.cfg, ctx.group

    def grow(needed: int, written: int) -> int:
        return accounting.grow(ctx.store, cfg, crash_id=crash.id, group=group, needed=needed, written=written,
                               lim=ctx.limits)

    placement = affinity.Placement(ctx.shared_cpu, slot) if ctx.shared_cpu else None
    fd, tmp = crash.open_temp(CORE)
    try:
        try:
            result = compress.compress_stream(ctx.core_fd, fd, limit=cap, prefix=ctx.early.core, eof=ctx.early.eof,
                                              level=cfg.compression_level, threads=cfg.compression_threads,
                                              max_output=admission.budget, grow=grow, read_done=ctx.let_go,
                                              streaming=placement)
        finally:
            ctx.let_go()  # a failed write ends the dump too
    except compress.OutputTooLarge as exc:
        # The storage policy's decision, like a core refused before it was read: not a failure.
        crash.discard(fd, tmp)
        record.core_refused(rec, f"no room for the core: {exc} (limited by {admission.limited_by})")
        return None
    except (OSError, Timeout) as exc:
        crash.discard(fd, tmp)
        not_saved(ctx, f"write failed: {exc}")
        return None
    if result.size == 0:
        crash.discard(fd, tmp)
        not_saved(ctx, "the kernel sent no core data (the pipe was empty)")
        return None
    expected = None if result.truncated else elf.expected_size(result.head)
    whole = expected is None or result.size >= expected
    reason = None
    if result.truncated:
        reason = (f"truncated at RLIMIT_CORE ({limit} bytes)" if cap == limit
                  else f"truncated at max_core_size ({cap} bytes)")
    elif not whole:
        reason = (f"the core ended after {result.size} of {expected} bytes: the kernel stopped the dump "
                  f"(the process was killed) or the pipe closed early; kept as {PARTIAL_CORE}")
    staged = Staged(fd, tmp, CORE if whole else PARTIAL_CORE)
    record.core_stored(rec, file=staged.name, size=result.size, complete=whole,
                       compressed_size=result.compressed_size, digest=result.digest, truncated=result.truncated,
                       reason=reason)
    if not whole:
        record.add_error(rec, reason)
        log(f"error: pid {ctx.args.pid}: {reason}", ERR)
    return staged


def not_saved(ctx: Context, reason: str) -> None:
    record.core_not_saved(ctx.record, reason)
    log(f"error: pid {ctx.args.pid}: core not saved: {reason}", ERR)
