"""platform/fs: the store's file primitives."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from support import mounted_tmpfs

from corepipe.platform import fs


def test_remove_tree_waits_until_the_tree_can_go(tmp_path: Path) -> None:
    """A tree that cannot be removed for a while (a handler still filing into it; here a mount inside it) is
    removed once it can, not left half-deleted with an error."""
    store = tmp_path / "store"
    (store / "crash").mkdir(parents=True)
    with mounted_tmpfs(store / "crash" / "busy", "1m") as busy:
        (busy / "core").write_bytes(b"x")
        release = threading.Timer(0.5, subprocess.run, (["umount", "-l", str(busy)],), {"check": True})
        release.start()
        try:
            fs.remove_tree_when_quiet(str(store), attempts=100, pause=0.05)
        finally:
            release.join()
    assert not store.exists()


def test_remove_tree_gives_up_with_the_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "crash").mkdir(parents=True)
    with mounted_tmpfs(store / "crash" / "busy", "1m"):
        with pytest.raises(OSError):
            fs.remove_tree_when_quiet(str(store), attempts=3, pause=0.01)
        assert store.is_dir()


def test_remove_tree_of_nothing_is_done(tmp_path: Path) -> None:
    fs.remove_tree_when_quiet(str(tmp_path / "absent"))
    assert os.listdir(tmp_path) == []
