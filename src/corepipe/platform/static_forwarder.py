"""The static C forwarder (corepipe-forward.c beside this module): built, checked and described for install.

Every crash on a pipe-mode host starts the pattern's program; when ``corepipe serve`` runs, all that program
does is hand the crash over (platform/forward.py). The C forwarder does that in under a millisecond and
0.6 MiB, where the Python launcher spends about 15 ms and 9 MiB on its interpreter, so ``corepipe install``
builds it wherever the host has a C compiler and a static libc, and falls back to the launcher otherwise.
The socket and the handler it falls back to are compiled in (the kernel starts it with an empty
environment and no configuration).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corepipe-forward.c")
NAME = "corepipe-forward"
#: The compilers tried, in order, on PATH.
COMPILERS = ("cc", "gcc", "clang")
BUILD_SECONDS = 120


class NotBuilt(Exception):
    """The forwarder could not be built or does not run here; the message says why (the launcher is used)."""


def _quoted(path: str) -> str:
    """``path`` as a C string literal; only plain absolute paths are compiled in."""
    if not os.path.isabs(path) or any(c.isspace() or c in '"\\' or not c.isprintable() for c in path):
        raise NotBuilt(f"the path {path!r} cannot be compiled in (absolute, no spaces, quotes or backslashes)")
    return f'"{path}"'


def build(socket: str, handler: str) -> bytes:
    """The forwarder's executable, statically linked, handing crashes to ``socket`` and executing ``handler``
    when no server takes one; raises NotBuilt (no compiler, no static libc, a failed check)."""
    compiler = next((found for name in COMPILERS if (found := shutil.which(name))), None)
    if compiler is None:
        raise NotBuilt(f"no C compiler on PATH ({', '.join(COMPILERS)})")
    with tempfile.TemporaryDirectory(prefix="corepipe-forward.") as tmp:
        out = os.path.join(tmp, NAME)
        command = [compiler, "-static", "-O2", "-Wall", "-o", out, f"-DCOREPIPE_FORWARD_SOCKET={_quoted(socket)}",
                   f"-DCOREPIPE_HANDLER={_quoted(handler)}", SOURCE]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS, cwd=tmp)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NotBuilt(f"{compiler} failed: {exc}") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise NotBuilt(f"{compiler} -static failed (a static libc, e.g. libc6-dev, is needed): {last}")
        if show(out) != {"socket": socket, "handler": handler}:
            raise NotBuilt(f"the forwarder built by {compiler} does not run as built")
        with open(out, "rb") as f:
            return f.read()


def show(path: str) -> Optional[dict]:
    """What the forwarder at ``path`` was built with (``socket``, ``handler``), run the way the kernel runs it
    (empty environment, cwd /); None when it does not run."""
    try:
        proc = subprocess.run([path, "--show"], env={}, cwd="/", capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    if proc.returncode != 0 or set(fields) != {"socket", "handler"}:
        return None
    return fields
