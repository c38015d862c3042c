"""The pipe handlers' handoffs in progress (platform/forward.py), between ``accept`` and the handler's GO.

The accept loop never waits on one handler: each connection is a small state machine, polled with the
listeners (its message, then ACCEPT or BUSY, then GO). A handler that is slow to send, one the scheduler has
not run yet in a storm of a hundred, holds up nobody; one that closes, or is silent for ``SECONDS``, is dropped
without a byte of its pipe read (it collects the crash itself). The server never gives up on a GO before the
handler could have sent it, so a handler never exits believing the server took a crash it dropped.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Callable, Optional

from corepipe.platform import forward
from corepipe.platform.fs import unlink_if_present
from corepipe.platform.log import ERR, log

#: How long a handler may take to send its message, and then its GO. Neither wait holds up the loop; the
#: handler itself gives up after ``forward.ACK_SECONDS`` without an answer, and after our ACCEPT it only sends GO.
SECONDS = 10.0


class Handoff:
    """One handler's connection: ``got`` is None until its message came; ``journal`` is set once accepted."""

    def __init__(self, conn: socket.socket, now: float):
        self.conn, self.accepted, self.deadline = conn, now, now + SECONDS
        self.got: Optional[forward.Forwarded] = None
        self.journal: Optional[str] = None

    def drop(self) -> None:
        """Give the crash back to the handler: our copies of its fds close, its journal entry goes."""
        unlink_if_present(self.journal)
        if self.got is not None:
            self.got.close()
        self.conn.close()


#: ``judge(got)``: why the server refuses a well-formed handoff (the handler then collects), or None.
Judge = Callable[[forward.Forwarded], Optional[str]]
#: ``note(got)``: the crash's journal entry, written before ACCEPT (services/forwarded.py).
Note = Callable[[forward.Forwarded], Optional[str]]


class Handoffs:
    """The open handoffs, by fd, registered with the accept loop's poller."""

    def __init__(self, poller: select.poll, judge: Judge, note: Note, stats: object):
        self.poller, self.judge, self.note, self.stats = poller, judge, note, stats
        self.open: dict = {}

    def __len__(self) -> int:
        return len(self.open)

    def add(self, conn: socket.socket) -> Optional[Handoff]:
        """A handler's new connection; the finished handoff when its message and GO were already there."""
        conn.setblocking(False)
        handoff = Handoff(conn, time.monotonic())
        self.open[conn.fileno()] = handoff
        self.poller.register(conn.fileno(), select.POLLIN)
        return self.step(conn.fileno())

    def step(self, fd: int) -> Optional[Handoff]:
        """Advance the handoff on ``fd`` as far as what it sent allows; the handoff once the crash is ours
        (its GO came: the caller queues ``got`` with ``journal``), else None."""
        handoff = self.open.get(fd)
        if handoff is None:
            return None
        try:
            if handoff.got is None and not self._message(handoff):
                return None
            answer = handoff.conn.recv(16)
        except BlockingIOError:
            return None
        except OSError:
            answer = b""
        self._forget(fd)
        if answer != forward.GO:  # the handler gave up waiting: it collects the crash, not us
            handoff.drop()
            return None
        handoff.conn.close()
        return handoff

    def _message(self, handoff: Handoff) -> bool:
        """Read the handoff's message and answer it: True once ACCEPT went (a GO to wait for)."""
        fd = handoff.conn.fileno()
        try:
            handoff.got = forward.receive(handoff.conn)
        except BlockingIOError:
            raise
        except forward.Probe:  # ``corepipe status`` checking that we accept
            self._close(fd)
            return False
        except (forward.ForwardError, OSError) as exc:
            log(f"error: serve: a handoff refused (the handler collects the crash): {exc}", ERR)
            self._refuse(fd, str(exc))
            return False
        why = self.judge(handoff.got)
        if why is not None:
            self._refuse(fd, why)
            return False
        handoff.journal = self.note(handoff.got)
        try:
            handoff.conn.send(forward.ACCEPT)
        except OSError:  # the handler is gone: it collects the crash
            self._close(fd)
            return False
        handoff.deadline = time.monotonic() + SECONDS
        return True

    def expire(self, now: float) -> list:
        """Drop the handoffs silent past their deadline; the ones whose GO came meanwhile (one last look
        first), to be queued. Before that look the connection is shut for reading: a GO the handler sends
        later fails (EPIPE) and the handler collects, never a GO that arrives unread between the look and the
        close."""
        taken = []
        for fd in [fd for fd, h in self.open.items() if now >= h.deadline]:
            handoff = self.open[fd]
            try:
                handoff.conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            if self.step(fd) is not None:
                taken.append(handoff)
                continue
            log(f"error: serve: a handler sent no {'GO' if handoff.got else 'message'} within {SECONDS:g} s; "
                "its crash is the handler's", ERR)
            if fd in self.open:
                self._close(fd)
        return taken

    def step_all(self) -> list:
        """Every open handoff advanced (the server stopping polls them this way); ``step``'s answer for each."""
        return [self.step(fd) for fd in list(self.open)]

    def _refuse(self, fd: int, why: str) -> None:
        self.stats.forward_refused += 1
        forward.refuse(self.open[fd].conn, why)
        self._close(fd)

    def _close(self, fd: int) -> None:
        self._forget(fd).drop()

    def _forget(self, fd: int) -> Handoff:
        self.poller.unregister(fd)
        return self.open.pop(fd)

    def close_copies(self) -> None:
        """In a forked worker: its copies of the handoffs' fds, which would hold the crashed processes."""
        for handoff in self.open.values():
            handoff.conn.close()
            if handoff.got is not None:
                handoff.got.close()
        self.open.clear()
