"""containers.identify over real /proc/<pid>/cgroup texts: every runtime and driver, v1, v2 and hybrid, and negatives.

tests/fixtures/cgroup/expected.json lists each case: its cgroup text (``<case>.txt`` or ``file``),
where the text came from, optional runtime state files that must exist (created empty under a
temporary root: identify only checks that they exist), an optional mountinfo and hostname, and
the fields the answer must have.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corepipe.domain import containers

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cgroup"
CASES = json.loads((FIXTURES / "expected.json").read_text())


def _subset(actual: dict, expected: dict, where: str = "") -> None:
    for key, value in expected.items():
        if isinstance(value, dict):
            _subset(actual.get(key) or {}, value, f"{where}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(actual.get(key) or []) == len(value), f"{where}{key}: {actual.get(key)!r}"
            for i, item in enumerate(value):
                _subset(actual[key][i], item, f"{where}{key}[{i}].")
        else:
            assert actual.get(key) == value, f"{where}{key}: {actual.get(key)!r} != {value!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    assert case["source"], "every fixture says where it came from"
    for relative in case.get("state", []):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("{}")
    text = (FIXTURES / case.get("file", f"{name}.txt")).read_text()
    mountinfo = (FIXTURES / case["mountinfo"]).read_text() if "mountinfo" in case else ""
    found = containers.identify(text, mountinfo=mountinfo, hostname=case.get("hostname"), root=str(tmp_path))
    _subset(found.to_dict(), case["expect"])
    # The cgroup alone never confirms a container: without the process, its policy group is the crashing uid.
    assert found.confidence != "certain"
    assert found.policy_group(4321) == tuple(case.get("group", ["uid", "4321"]))


def test_every_fixture_file_is_used() -> None:
    used = {c.get("file", f"{n}.txt") for n, c in CASES.items()} | {c["mountinfo"] for c in CASES.values()
                                                                    if "mountinfo" in c}
    on_disk = {p.name for p in FIXTURES.iterdir() if p.suffix == ".txt"}
    assert on_disk == used


def test_every_runtime_has_a_case() -> None:
    runtimes = {c["expect"]["runtime"] for c in CASES.values()}
    assert runtimes >= {"host", "docker", "containerd", "cri-o", "podman", "runc", "lxc", "nspawn", "kubernetes",
                        "ecs", "libvirt"}


def test_state_paths_come_only_from_validated_ids(tmp_path: Path) -> None:
    """A cgroup segment that would climb out of a state directory is never looked up.

    Each planted state.json is where an unvalidated '..' segment would lead (runc: run/runc/../,
    containerd: run/containerd/runc/<ns>/../); all of them must be ignored.
    """
    for planted in ("run/state.json", "run/containerd/runc/state.json", "run/containerd/x/state.json"):
        (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / planted).write_text("{}")
    (tmp_path / "run" / "runc").mkdir()
    for text in ("0::/..\n", "0::/../x\n", "0::/system.slice/runc-...scope\n", "0::/x/..\n", "0::/runc-...scope\n"):
        assert containers.identify(text, root=str(tmp_path)).is_host, text
