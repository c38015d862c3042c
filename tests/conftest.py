from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import HERE, Handler, KernelSettings, need, need_root_kernel, short_tempdir


@pytest.fixture(scope="session")
def crasher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The crasher, built statically with debug info so it also runs inside a bare container."""
    gcc = shutil.which("gcc")
    need(gcc is not None, "needs gcc to build the test crasher")
    out = tmp_path_factory.mktemp("crasher") / "crasher"
    subprocess.run([gcc, "-g", "-O0", "-static", "-o", str(out), str(HERE / "crasher.c")], check=True)
    return out


@pytest.fixture
def handler_dir() -> Path:
    path = short_tempdir()
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kernel_handler(handler_dir: Path) -> Handler:
    """corepipe as the real kernel's core_pattern handler, restored afterwards."""
    need_root_kernel()
    handler = Handler(handler_dir)
    with KernelSettings() as settings:
        settings.set(handler.pattern())
        yield handler
