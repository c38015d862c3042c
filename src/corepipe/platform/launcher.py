"""The executable the kernel runs for every crash: a Python script that starts as little as possible.

The kernel starts the handler with an empty environment for every crash, so the
interpreter's own start-up is part of every crash's cost. ``python -I -S`` skips the
site module (the .pth files of site-packages, ~2 ms) and ignores PYTHON* variables and
the script's directory (safer for a root handler); the directories corepipe and its
dependencies live in are then put on sys.path explicitly, as found at install time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

from corepipe.platform.forward import DEFAULT_SOCKET

#: What ``corepipe collect`` imports from outside the standard library.
COLLECT_DEPENDENCIES = ("corepipe", "zstandard", "xxhash") + (("tomli",) if sys.version_info < (3, 11) else ())


def search_path() -> list:
    """The directories holding corepipe and its collect-path dependencies, in this interpreter."""
    paths: list = []
    for name in COLLECT_DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} is not installed for {sys.executable}")
        parent = os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))
        if parent not in paths:
            paths.append(parent)
    return paths


def script(python: Optional[str] = None, paths: Optional[list] = None, forward: Optional[str] = None) -> str:
    """The launcher's text: ``#!<python> -IS`` with an explicit sys.path, then ``corepipe.cli.main`` with the
    socket of the ``corepipe serve`` that ``collect`` hands crashes to (``forward``; default the server's
    default, platform/forward.py)."""
    python = python or sys.executable
    paths = search_path() if paths is None else paths
    forward = forward or DEFAULT_SOCKET
    if any(c.isspace() for c in python):
        raise ValueError("the interpreter's path must not contain white space (it goes on a #! line)")
    return (f"#!{python} -IS\n"
            f"import sys\n"
            f"sys.path[:0] = {paths!r}\n"
            f"from corepipe.cli import main\n"
            f"raise SystemExit(main(forward={forward!r}))\n")
