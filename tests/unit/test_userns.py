"""platform/userns.py: the user a subordinate uid belongs to, from an /etc/subuid file and from the kernel."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from corepipe.platform import userns


def test_a_subuid_range_names_its_owner(tmp_path: Path) -> None:
    root_name = pwd.getpwuid(0).pw_name
    subuid = tmp_path / "subuid"
    subuid.write_text(f"# comment\nbroken line\n{root_name}:100000:65536\n1000:300000:10\nnobody-such-user:400000:5\n"
                      "x:y:z\n")
    assert userns.subuid_owner(100000, str(subuid)) == 0
    assert userns.subuid_owner(165535, str(subuid)) == 0
    assert userns.subuid_owner(165536, str(subuid)) is None  # just past the range
    assert userns.subuid_owner(300009, str(subuid)) == 1000
    assert userns.subuid_owner(400001, str(subuid)) is None  # an owner with no account
    assert userns.subuid_owner(5, str(tmp_path / "missing")) is None


def test_this_processs_own_namespace_has_no_owner_to_report() -> None:
    fd = os.open("/proc/self/ns/user", os.O_RDONLY)
    try:
        assert userns.namespace_owner(fd) is None
    finally:
        os.close(fd)
