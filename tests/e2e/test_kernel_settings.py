"""support.KernelSettings restores the host even when the test process is killed inside its block (issue 14's
test gap: a killed FUSE test once left core_pattern at a handler in a deleted /tmp directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from support import HERE, KernelSettings, need_root_kernel, read_line

CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from support import KernelSettings
settings = KernelSettings().__enter__()
settings.set("|/nonexistent/corepipe-killed-test %p", pipe_limit=7)
settings.undo_on_abort(["touch", sys.argv[2]])
print("set", flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_killed_test_process_still_restores_the_kernel_settings(tmp_path: Path) -> None:
    need_root_kernel()
    marker = tmp_path / "undone"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(HERE), str(marker)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert read_line(child.stdout) == "set\n"
    assert child.wait(timeout=60) == -signal.SIGKILL
    with KernelSettings() as settings:  # the lock is free once the watchdog has restored and exited
        assert b"corepipe-killed-test" not in settings.saved_pattern, settings.saved_pattern
        assert settings.saved_limit != b"7\n"
    assert marker.exists(), "the registered undo command did not run"
