"""One crash's collection, carried through every stage of services/collect.py.

systemd-coredump passes one ``Context`` to each stage; so does corepipe: the stages read what they
need from it and return what they produce, which the pipeline stores back here. The same object
serves ``corepipe collect`` (the kernel's pipe on stdin) and any other entry point that has a core on
an fd and the crashed process's identity (a socket server builds ``args`` from its peer's pidfd).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from corepipe.domain.binaries import HeldFiles
from corepipe.domain.containers import Container
from corepipe.domain.policy import Limits
from corepipe.domain.snapshot import Snapshot
from corepipe.platform.affinity import SharedCpu
from corepipe.platform.capture import STDIN, Capture, release
from corepipe.platform.config import Config
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import CrashDir, Store


@dataclass
class Context:
    #: What the kernel said about the crash (from its arguments, or built by a server from SO_PEERCRED/pidfd).
    args: KernelArgs
    #: What capture.take got while the process was held: /proc data, held files, the start of the core.
    early: Capture
    #: Where the rest of the core comes from; letting go of it lets the kernel reap the process.
    core_fd: int = STDIN
    cfg: Config = field(default_factory=Config)
    #: Decided before the dump (a socket server answered the kernel REJECT): no core is read and the
    #: record gives this reason, as for a core the storage policy refused.
    refused: Optional[str] = None
    #: Why the crash's own directory could not be made (it is filed in store.FAILED, without its core).
    unfiled: Optional[str] = None
    #: Why the crash (without a core) got no record but a count in the books (accounting.record_refusal).
    uncounted: Optional[str] = None
    #: The store's effective limits (accounting.measure), measured once per crash: every later measurement of
    #: its free space reuses them.
    limits: Optional[Limits] = None
    #: Failures so far, before there is a record to put them in (kernel arguments, config, early capture).
    errors: list = field(default_factory=list)
    snapshot: Optional[Snapshot] = None
    container: Optional[Container] = None
    held: Optional[HeldFiles] = None
    store: Optional[Store] = None
    crash: Optional[CrashDir] = None
    record: Optional[dict] = None
    #: The crashed task's dumping thread and this reading thread, on one CPU or apart while the core is read
    #: (affinity.py: whichever reads it faster).
    shared_cpu: Optional[SharedCpu] = None
    #: How the core comes (record.build's ``transport``): "pipe", "socket" or "forwarded".
    transport: str = "pipe"
    #: A server's journal entry of this crash (services/forwarded.py): it names the first record, and goes with the
    #: final one (platform/journal.py).
    journal: Optional[str] = None

    @property
    def group(self) -> tuple:
        """The policy group the crash counts under (its store directory, its limits): see Container.policy_group."""
        return self.container.policy_group(self.args.uid)

    def let_go(self) -> None:
        """Release the kernel (once): the crashed process is reaped when nothing reads its core any more."""
        if not self.early.released:
            release(self.core_fd)
            self.early.released = True
        if self.shared_cpu is not None:
            self.shared_cpu.leave()
