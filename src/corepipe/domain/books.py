"""The store's books: its lock, its ledger and its state file, and every change to what the store holds.

``Books`` is the store under its lock (platform/lock.py). Whatever adds a core to the store or deletes
anything from it does it here: the collector's commit and final record, admission making room
(accounting.py), ``rm``, ``prune``, ``ship``'s delete-after-ship, ``uninstall --purge`` and ``selftest``.
So the ledger (ledger.py: what admission reads instead of scanning) is right as soon as the lock is let
go, and a saved binary goes with the last core that used it. The state file (state.py: rate histories,
reservations, signatures seen, per-group counters) is read the first time ``state`` is asked for and
written back when the books close if it changed; a garbled one is started anew with one line logged.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, TypeVar

from corepipe.domain import binaries, catalog, ledger, policy, state
from corepipe.domain import record as records
from corepipe.platform.lock import StoreLock
from corepipe.platform.log import ERR, log
from corepipe.platform.store import (
    GROUP_LEDGER,
    LEDGER,
    RECORD,
    STATE,
    CrashDir,
    Store,
    StoreDir,
    StoreError,
    read_file,
)

_MAX_LEDGER = 256 << 20
_MAX_STATE = 4 << 20
T = TypeVar("T")


def rebuild_ledger(store: Store, contents: Optional[catalog.Contents] = None) -> ledger.Ledger:
    """The ledger from the store's directories and records (``contents``: a scan already made); every group
    seen is marked for writing, so a stale group file goes too."""
    contents = contents if contents is not None else catalog.scan(store)
    books = ledger.Ledger()
    for core in contents.crashes:
        books.dirty.add(core.group)
        if core.file is not None:
            books.add_core(core.group, core.crash, core.file, core.size, core.time)
        try:
            crash = _open_crash(store, core.group, core.crash)
        except OSError:
            continue
        try:
            rec = catalog.read_record(crash.fd)
        except (OSError, ValueError):
            continue
        finally:
            crash.close()
        if rec.get("status") != "collecting":  # a handler still at work counts its record when it finishes
            books.add_record(core.group, core.record)
        if core.file is not None:
            books.add_binaries(core.group, core.crash, binaries.on_disk(store.fd, rec)[0])
    return books


def dropped_records(root: str) -> dict:
    """Policy group -> crashes counted instead of recorded (``records_dropped``), from the state file, read
    without the lock for ``status`` and the metrics (the file is replaced whole, so a reader sees the old or the
    new one); {} when there is no store or state, or it cannot be read (not root: the store is 0700)."""
    try:
        with Store(root, create=False) as store:
            data = read_file(store.fd, STATE, _MAX_STATE)
        loaded = state.loads(data)[0] if data is not None else state.State()
    except (OSError, StoreError, ValueError):
        return {}
    return {group: counts["records_dropped"] for group, counts in loaded.counters.items()
            if counts.get("records_dropped")}


def _open_crash(store: Store, group: str, crash: str) -> CrashDir:
    return CrashDir(store.open_path(group.split("/") + [crash]), f"{store.root}/{group}/{crash}", crash)


class Books:
    """The store under its lock, with its ledger (loaded when first used, rebuilt when missing, unreadable or
    inconsistent, saved when changed) and its state file (``state``). ``save=False`` is for a question that
    changes nothing (the socket server's before the dump, ``prune --dry-run``): neither a ledger it had to
    rebuild nor the state is written then (two fsyncs, up to 30 ms on a busy disk, while the kernel waits for
    the ack); the next user rebuilds and saves it."""

    def __init__(self, store: Store, save: bool = True):
        self.store = store
        self.save = save
        self._lock = StoreLock(store)
        self._ledger: Optional[ledger.Ledger] = None
        self._rebuilt = False
        self._state: Optional[state.State] = None
        self._state_read = b""

    def __enter__(self) -> Books:
        self._lock.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.save and self._state is not None and exc[0] is None:
                self._save_state()
            if self.save and self._ledger is not None and (self._ledger.dirty or self._ledger.changed
                                                           or self._rebuilt):
                self._save_ledger_or_drop()
        finally:
            self._lock.__exit__(*exc)

    def _save_ledger_or_drop(self) -> None:
        try:
            self.save_ledger()
        except OSError as error:  # a full disk: what was decided stands; the next user rebuilds the ledger
            log(f"error: {self.store.root}/{LEDGER}: cannot save it ({error}); it will be rebuilt", ERR)
            try:
                os.unlink(LEDGER, dir_fd=self.store.fd)
            except OSError:
                pass

    # -- the state file ---------------------------------------------------------------------------------

    @property
    def state(self) -> state.State:
        """The state file's contents (state.py); changes are written when the books close."""
        if self._state is None:
            self._state = self._load_state()
        return self._state

    def _read(self, name: str, limit: int, instead: str) -> Optional[bytes]:
        """One of the store's own files; None when it is missing or cannot be read (logged, with what is done
        ``instead``)."""
        try:
            return read_file(self.store.fd, name, limit)
        except (OSError, StoreError) as exc:
            log(f"error: {self.store.root}/{name}: {exc}; {instead}", ERR)
            return None

    def _load_state(self) -> state.State:
        data = self._read(STATE, _MAX_STATE, "starting a new one")
        if data is None:
            return state.State()
        try:
            loaded, dropped = state.loads(data)
        except ValueError as exc:
            log(f"error: {self.store.root}/{STATE} unreadable ({str(exc)[:200]}); starting a new one", ERR)
            return state.State()
        if dropped:
            log(f"error: {self.store.root}/{STATE}: dropped {dropped} entries of the wrong type", ERR)
        else:
            self._state_read = data
        return loaded

    def _save_state(self) -> None:
        data = self.state.dumps()
        if data == self._state_read:
            return
        try:
            self.store.write(STATE, data)
        except OSError as error:  # a full disk: the rate histories and reservations of this call are lost
            log(f"error: {self.store.root}/{STATE}: cannot save it ({error})", ERR)

    # -- the ledger -------------------------------------------------------------------------------------

    @property
    def ledger(self) -> ledger.Ledger:
        if self._ledger is None:
            self._ledger = self._load_ledger()
        return self._ledger

    def _load_ledger(self) -> ledger.Ledger:
        data = self._read(LEDGER, _MAX_LEDGER, "rebuilding it")
        loaded = ledger.loads(data, self.load_group) if data is not None else None
        if loaded is not None:
            return loaded
        if data is not None:
            log(f"error: {self.store.root}/{LEDGER} is not a ledger of ours; rebuilding it", ERR)
        return self.rebuild()

    def load_group(self, group: str) -> Optional[dict]:
        """The cores a group's ledger file lists; None when it has none."""
        try:
            fd = self.store.open_path(group.split("/"))
        except FileNotFoundError:
            return None
        try:
            data = read_file(fd, GROUP_LEDGER, _MAX_LEDGER)
        except (OSError, StoreError) as exc:
            log(f"error: {self.store.root}/{group}/{GROUP_LEDGER}: {exc}", ERR)
            data = b""
        finally:
            os.close(fd)
        return ledger.group_loads(data) if data is not None else None

    def rebuild(self, contents: Optional[catalog.Contents] = None) -> ledger.Ledger:
        """Replace the ledger by what the store's directories say (``corepipe prune``, or a damaged ledger)."""
        self._ledger = rebuild_ledger(self.store, contents)
        self._rebuilt = True
        return self._ledger

    def checked(self, action: Callable[[], T]) -> T:
        """``action()`` on the ledger; if a group's file turns out inconsistent, once more on a rebuilt one."""
        try:
            return action()
        except ledger.Inconsistent as exc:
            log(f"error: {self.store.root}: the ledger is inconsistent ({exc}); rebuilding it", ERR)
            stale = exc.group
            self.rebuild().dirty.add(stale)
            return action()

    def save_ledger(self) -> None:
        """The dirty groups' files, then the summary (written like any store file: hidden temporary, fsync,
        rename over whatever is there, never through it)."""
        books = self.ledger
        for group in sorted(books.dirty):
            try:
                directory = StoreDir(self.store.open_path(group.split("/")), f"{self.store.root}/{group}")
            except FileNotFoundError:
                continue
            try:
                data = books.group_dumps(group)
                if data is not None:
                    directory.write(GROUP_LEDGER, data)
                else:
                    try:
                        os.unlink(GROUP_LEDGER, dir_fd=directory.fd)
                    except FileNotFoundError:
                        pass
            finally:
                directory.close()
        books.dirty.clear()
        self.store.write(LEDGER, books.dumps())
        books.changed = False
        self._rebuilt = False

    # -- what the store holds: added ------------------------------------------------------------------

    def add_core(self, crash: CrashDir, group: str, file: str) -> None:
        """A core was just put in place as ``file`` in ``crash`` (of ``group``)."""
        st = os.stat(file, dir_fd=crash.fd, follow_symlinks=False)
        name = os.path.basename(crash.path)
        unused = self.checked(lambda: self.ledger.add_core(group, name, file, st.st_blocks * 512, time.time()))
        binaries.remove(self.store.fd, unused)

    def add_binaries(self, crash: CrashDir, group: str, rec: dict) -> None:
        """Register the binaries the record says were saved for its (stored) core."""
        name = os.path.basename(crash.path)
        items, missing = binaries.on_disk(self.store.fd, rec)
        if missing:
            records.binaries_dropped(rec, "deleted before this crash could keep it", set(missing))
        self.checked(lambda: self.ledger.add_binaries(group, name, items))

    def add_record(self, crash: CrashDir, group: str) -> None:
        """Count the crash's record (just written, final) in its group's records."""
        size = _record_bytes(crash)
        self.checked(lambda: self.ledger.add_record(group, size))

    def rewrite_record(self, crash: CrashDir, group: str, write: Callable[[], None]) -> None:
        """``write`` the crash's final record again (already counted by ``add_record``): its bytes in the ledger
        are replaced, not added again."""
        before = _record_bytes(crash)
        write()
        after = _record_bytes(crash)

        def replace() -> None:
            self.ledger.remove_record(group, before)
            self.ledger.add_record(group, after)
        self.checked(replace)

    def count_instead(self, crash: CrashDir, group: str, reason: str) -> int:
        """A crash without a core whose record is not to be kept (``reason``: over its group's records budget,
        or below keep_free): its directory (an uncounted first record) goes, and the group's ``records_dropped``
        counter (state.py) goes up instead; returns that counter."""
        _empty(crash)
        parent_fd = self.store.open_path(group.split("/"))
        try:
            os.rmdir(os.path.basename(crash.path), dir_fd=parent_fd)
        except OSError as exc:
            log(f"error: {crash.path}: cannot remove the directory of a crash not recorded: {exc}", ERR)
        finally:
            os.close(parent_fd)
        return self.state.count(group, "records_dropped")

    def drop_binaries(self, keys: set) -> int:
        """Binaries saved for a crash whose core went before they were registered: delete those no core uses."""
        return binaries.remove(self.store.fd, sorted(k for k in keys if k not in self.ledger.binaries))

    # -- what the store holds: deleted ----------------------------------------------------------------

    def delete_core(self, core: policy.Core, reason: str) -> int:
        """Delete a crash's core and say so in its record (which stays), with the saved binaries only it used;
        returns how many of those were deleted."""
        try:
            crash = _open_crash(self.store, core.group, core.crash)
        except FileNotFoundError:
            return self._forget(core.group, core.crash)  # gone already: the ledger was behind
        try:
            try:
                os.unlink(core.file, dir_fd=crash.fd)
            except FileNotFoundError:
                pass
            try:
                rec = catalog.read_record(crash.fd)
                records.core_deleted(rec, reason)
                crash.write(RECORD, records.dumps(rec))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log(f"error: {crash.path}: core deleted but its record not updated: {exc}", ERR)
        finally:
            crash.close()
        return self._forget(core.group, core.crash)

    def delete_crash(self, group: str, crash: str) -> int:
        """Delete a whole crash directory (its files are never followed), with the saved binaries only its core
        used; returns how many of those were deleted."""
        crash_dir = _open_crash(self.store, group, crash)
        try:
            try:
                record_size = _record_bytes(crash_dir)
                self.checked(lambda: self.ledger.remove_record(group, record_size))
            except FileNotFoundError:
                pass
            _empty(crash_dir)
        finally:
            crash_dir.close()
        removed = self._forget(group, crash)  # its core is gone, even if the directory cannot go
        parent_fd = self.store.open_path(group.split("/"))
        try:
            os.rmdir(crash, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        return removed

    def delete_temp(self, temp: catalog.Temp) -> None:
        crash = _open_crash(self.store, temp.group, temp.crash)
        try:
            os.unlink(temp.name, dir_fd=crash.fd)
        finally:
            crash.close()

    def _forget(self, group: str, crash: str) -> int:
        unused = self.checked(lambda: self.ledger.remove(group, crash))
        return binaries.remove(self.store.fd, unused)


def _empty(crash: CrashDir) -> None:
    """Unlink the files of a crash's directory (never following them; a directory planted in it stays, so the
    crash's own rmdir then fails and says so)."""
    for name in os.listdir(crash.fd):
        try:
            os.unlink(name, dir_fd=crash.fd)
        except IsADirectoryError:
            pass


def _record_bytes(crash: CrashDir) -> int:
    """What the crash's record takes on disk, as ``catalog.scan`` counts it."""
    return os.stat(RECORD, dir_fd=crash.fd, follow_symlinks=False).st_blocks * 512
