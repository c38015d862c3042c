"""Fixtures shared by every test, and the markers each test gets from what it uses (docs/testing.md)."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from support import (
    HERE,
    REAL_INSTALLATION,
    Handler,
    KernelSettings,
    changes,
    fingerprint,
    mark_kernel_log,
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


# Podman reads only the tests' own containers.conf (no default ulimits, which runc here refuses to raise): the
# host's /etc/containers is left as it is.
os.environ.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))


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
    and the kernel's core settings. Only as root: another user can neither read an installation nor change one."""
    if os.geteuid() != 0:
        yield
        return
    before = fingerprint(REAL_INSTALLATION)
    yield
    changed = changes(before, fingerprint(REAL_INSTALLATION))
    if changed:
        pytest.fail(f"the tests changed the host's corepipe installation: {'; '.join(changed[:10])}", pytrace=False)


@pytest.fixture(autouse=True)
def kernel_log_mark(request: pytest.FixtureRequest) -> None:
    """Before each test that needs root: a mark in the kernel log, after which support.dmesg_lines reads."""
    if request.node.get_closest_marker("root") is not None and os.access("/dev/kmsg", os.W_OK):
        mark_kernel_log(request.node.nodeid)


#: Marker -> the fixtures that give it (``item.fixturenames`` holds every fixture a test uses, however indirectly).
MARKER_FIXTURES = {
    "root": {"kernel_handler", "fake_containers", "stand_ins", "docker_image", "settings"},
    "kernel": {"kernel_handler"},
    "runtime": {"docker_image"},
    "server": {"server"},
}
#: Marker -> the names whose mention in a test's code (its own, its fixtures' and the tests' helpers' it calls)
#: gives it. Requirements are met with need*() at run time; these are what names them.
MARKER_WORDS = {
    "root": ("geteuid", "need_root_kernel", "installed_handler", "served_handler", "KernelSettings", "mounted_tmpfs",
             "FakeContainers", "StandIns", "docker_usable", "unshare", "nsenter", "cgroup.procs"),
    "kernel": ("need_root_kernel", "installed_handler", "served_handler", "KernelSettings"),
    "runtime": ("docker_usable", "runtimes.", "from runtimes", "need_tool(\"docker", "need_tool(\"podman",
                "need_tool(\"runc", "need_tool(\"containerd", "need_tool(\"ctr"),
    "server": ("objectstores", "prometheus"),
}
#: Time budgets (s) of whole modules above the default ``timeout`` of pyproject.toml: storms, installs into a
#: fresh venv, image builds. A test's own ``@pytest.mark.timeout`` wins.
BUDGETS = {"test_storm.py": 900, "test_install_kernel.py": 1200, "test_kubernetes_node.py": 900,
           "test_container_runtimes.py": 600, "test_ship.py": 600, "test_docker_smoke.py": 600}
TESTS = Path(__file__).resolve().parent
#: Autouse fixtures every test gets: what they need says nothing about the test's own requirements.
HOUSEKEEPING = {"real_installation_untouched", "kernel_log_mark"}


def _code_text(function: object, seen: set, depth: int = 3) -> str:
    """The source of ``function`` and of the tests' own functions and classes it names, ``depth`` calls deep."""
    function = inspect.unwrap(function)
    if id(function) in seen or depth < 0:
        return ""
    seen.add(id(function))
    try:
        text = inspect.getsource(function)
    except (OSError, TypeError):
        return ""
    code = getattr(function, "__code__", None)
    names: set = set()
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    scope = getattr(function, "__globals__", {})
    for name in names:
        target = scope.get(name)
        source = getattr(inspect.getmodule(target), "__file__", None) if target is not None else None
        if source and Path(source).resolve().is_relative_to(TESTS) and callable(target):
            text += _code_text(target, seen, depth - 1)
    return text


def markers_of(item: pytest.Item) -> set:
    """The requirement markers of a test, from the fixtures it uses and the code it runs; ``unit`` when it is
    under tests/unit and has none."""
    fixtures = set(item.fixturenames)
    seen: set = set()
    text = _code_text(item.function, seen)
    for name in fixtures - HOUSEKEEPING:
        for definition in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if Path(inspect.getsourcefile(definition.func) or "").resolve().is_relative_to(TESTS):
                text += _code_text(definition.func, seen)
    found = {m for m, names in MARKER_FIXTURES.items() if fixtures & names}
    found |= {m for m, words in MARKER_WORDS.items() if any(w in text for w in words)}
    found |= {m.name for m in item.iter_markers() if m.name in MARKER_WORDS}
    if not found and TESTS / "unit" in Path(item.fspath).parents:
        found.add("unit")
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        for name in sorted(markers_of(item)):
            item.add_marker(name)
        budget = BUDGETS.get(Path(item.fspath).name)
        if budget and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(budget))
