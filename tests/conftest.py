from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import (
    HERE,
    REAL_INSTALLATION,
    Handler,
    KernelSettings,
    changes,
    fingerprint,
    need,
    need_root_kernel,
    short_tempdir,
)


def build_static(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """tests/NAME.c built statically with debug info, so it also runs inside a bare container."""
    gcc = shutil.which("gcc")
    need(gcc is not None, f"needs gcc to build tests/{name}.c")
    out = tmp_path_factory.mktemp(name) / name
    subprocess.run([gcc, "-g", "-O0", "-static", "-o", str(out), str(HERE / f"{name}.c")], check=True)
    return out


@pytest.fixture(scope="session")
def crasher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_static(tmp_path_factory, "crasher")


@pytest.fixture(scope="session")
def forger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A crasher that rewrites its own environment first (tests/forger.c)."""
    return build_static(tmp_path_factory, "forger")


@pytest.fixture(scope="session")
def bugs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tests/bugs.c built statically with debug info (``bugs``), a stripped copy (``stripped``) and a copy under
    another name (``looper``), for the signature tests."""
    gcc = shutil.which("gcc")
    need(gcc is not None, "needs gcc to build tests/bugs.c")
    out = tmp_path_factory.mktemp("bugs")
    programs = {"bugs": out / "bugs", "stripped": out / "bugs-stripped", "looper": out / "looper"}
    subprocess.run([gcc, "-g", "-O0", "-static", "-o", str(programs["bugs"]), str(HERE / "bugs.c")], check=True)
    subprocess.run(["strip", "-o", str(programs["stripped"]), str(programs["bugs"])], check=True)
    shutil.copy2(programs["bugs"], programs["looper"])
    return programs


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
        handler.settings = settings
        yield handler


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory, crasher: Path) -> Path:
    from runtimes import make_rootfs

    return make_rootfs(tmp_path_factory.mktemp("rootfs"), crasher)


@pytest.fixture(scope="session")
def docker_image(rootfs: Path) -> str:
    """A Docker image of the test rootfs, removed at the end of the session."""
    from runtimes import image

    with image("docker", rootfs, "corepipe-test") as ref:
        yield ref


@pytest.fixture
def fake_containers():
    """Plain cgroups that look like Docker containers (tests/cgroups.py), removed afterwards."""
    from cgroups import FakeContainers

    made = FakeContainers()
    yield made
    made.remove()


@pytest.fixture
def stand_ins():
    """Containers corepipe confirms, made without a runtime (tests/cgroups.py), removed afterwards."""
    from cgroups import StandIns

    made = StandIns()
    yield made
    made.remove()


@pytest.fixture(scope="session", autouse=True)
def real_installation_untouched() -> None:
    """Fails the session if any test changed the host's own corepipe installation (or made one where there was
    none): its config, launcher, store and crashes, virtualenv, units, completion, man pages, sysctl drop-in,
    and the kernel's core settings."""
    before = fingerprint(REAL_INSTALLATION)
    yield
    changed = changes(before, fingerprint(REAL_INSTALLATION))
    if changed:
        pytest.fail(f"the tests changed the host's corepipe installation: {'; '.join(changed[:10])}", pytrace=False)
