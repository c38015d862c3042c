"""``corepipe debug`` shows the source line (issue 31): the seed article's program, crashed in a Docker
container through the real kernel, debugged with real gdb in its jail.

The article ends with ``gdb ./segfault core`` printing ``11  *(str+1) = 'n';``. Here the program is built
as there (``gcc hoge.c -g``, static so it runs in a busybox image), and gdb must find ``hoge.c`` through
the binary's compile directory, the directory ``debug`` runs from, ``--source`` or ``--substitute-path``:
the debugger's root holds nothing else of the host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runtimes import docker_import, make_rootfs, unique
from support import need, need_tool
from test_crash_tools import _docker_crash

HOGE = """#include <stdio.h>
int main()
{
   char *str;

   /* Stored in read only part of data segment */
   str = "GfG";

   /* Problem:  trying to modify read only memory */
   *(str+1) = 'n';
   return 0;
}
"""
LINE = "*(str+1) = 'n';"


def _dir(parent: Path, name: str) -> Path:
    """A directory gdb may be shown: root's, writable by no one else."""
    path = parent / name
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def _build(directory: Path, *flags: str) -> Path:
    """hoge.c compiled in ``directory`` as the article does (relative name, -g), static for the busybox image."""
    gcc = shutil.which("gcc")
    need(gcc is not None, "needs gcc to build the seed's program")
    (directory / "hoge.c").write_text(HOGE)
    subprocess.run([gcc, "hoge.c", "-g", "-static", *flags, "-o", "segfault"], cwd=directory, check=True)
    return directory / "segfault"


@pytest.fixture
def builds(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


def _crash_in_docker(handler, program: Path, workdir: Path) -> dict:
    """The record of ``program`` crashed as PID 1 of a Docker container (image and container removed)."""
    root = make_rootfs(workdir, program)
    image = docker_import(root, unique("corepipe-31-src") + ":1")
    try:
        cid = _docker_crash(image, "/crasher")
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
    return handler.wait_record(lambda r: r["container"]["id"] == cid)


def _debug(handler, rec: dict, cwd: Path, *options: str) -> str:
    need_tool("gdb")
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(handler.config), "debug", *options,
                           rec["id"], "--", "-batch", "-ex", "bt"], capture_output=True, text=True, timeout=300,
                          cwd=cwd, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_seed_program_shows_its_source_line_with_no_flag(kernel_handler, builds: Path) -> None:
    source = _dir(builds, "seed")
    rec = _crash_in_docker(kernel_handler, _build(source), _dir(builds, "image"))
    assert rec["container"]["runtime"] == "docker"

    # From the directory holding hoge.c, as in the article.
    out = _debug(kernel_handler, rec, source)
    assert re.search(r"^10\s+\*\(str\+1\) = 'n';$", out, re.M), out
    assert "No such file" not in out, out
    # From anywhere else: the compile directory the binary names is shown to gdb.
    out = _debug(kernel_handler, rec, _dir(builds, "elsewhere"))
    assert LINE in out, out

    # info names the saved copy of every saved binary; it is the crashed executable.
    info = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(kernel_handler.config), "info",
                           rec["id"]], capture_output=True, text=True, timeout=60, check=True).stdout
    saved = re.findall(r"^    saved as (/\S+)$", info, re.M)
    stored = [e for e in rec["binaries"]["files"] if e["stored"]]
    assert stored and len(saved) == len(stored), info
    assert rec["binaries"]["errors"] == [], rec["binaries"]  # the executable was held: no failure to report
    for path, entry in zip(saved, stored):
        assert Path(path).is_file() and entry["build_id"] in path.replace("/", ""), info
    assert Path(saved[0]).read_bytes() == (source / "segfault").read_bytes()


def test_sources_that_live_elsewhere(kernel_handler, builds: Path) -> None:
    """Built at /src (as in a container's build stage), the checkout elsewhere on the host."""
    need(not os.path.exists("/src"), "needs no /src on this host")
    build = _dir(builds, "build")
    program = _build(build, f"-fdebug-prefix-map={build}=/src")
    checkout = _dir(builds, "checkout")
    shutil.move(build / "hoge.c", checkout / "hoge.c")
    rec = _crash_in_docker(kernel_handler, program, _dir(builds, "image"))
    elsewhere = _dir(builds, "elsewhere")

    out = _debug(kernel_handler, rec, elsewhere)
    assert LINE not in out and "hoge.c: No such file or directory" in out, out  # nothing tells gdb where
    assert LINE in _debug(kernel_handler, rec, checkout)  # run from the checkout
    assert LINE in _debug(kernel_handler, rec, elsewhere, "--source", str(checkout))
    assert LINE in _debug(kernel_handler, rec, elsewhere, "--substitute-path", "/src", str(checkout))
    assert LINE in _debug(kernel_handler, rec, elsewhere, "--source", "../checkout")  # relative to where debug runs


def test_a_source_directory_is_read_only_to_gdb(kernel_handler, builds: Path) -> None:
    source = _dir(builds, "seed")
    rec = _crash_in_docker(kernel_handler, _build(source), _dir(builds, "image"))
    need_tool("gdb")
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(kernel_handler.config), "debug",
                           rec["id"], "--", "-batch", "-ex", f"dump binary value {source}/written 42",
                           "-ex", "dump binary value written-here 42", "-ex", "list main"],
                          capture_output=True, text=True, timeout=300, cwd=source, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert LINE in out, out  # gdb reads there...
    assert out.count("Read-only file system") == 2, out  # ...and cannot write there
    assert sorted(p.name for p in source.iterdir()) == ["hoge.c", "segfault"]
