"""gdb against a hostile crash, through the real kernel: what the crashed program carries and what the user's
environment says must not make gdb run code or reach out, at collection (the backtrace) or in ``corepipe debug``.

The program carries an inline auto-load script (``.debug_gdb_scripts``) that installs a frame filter renaming
every frame; its debug info is stripped, so a gdb with debuginfod on asks ``DEBUGINFOD_URLS`` for it; and
``debug`` runs with ``LD_PRELOAD`` naming a library that announces itself when loaded into gdb. Each attack is
first shown to work on a plain gdb (so the test can fail), then not to work through corepipe.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import NO_RATE_LIMIT, crash, installed_handler, need_tool, short_tempdir

from corepipe.platform.gdb import HARDENING

MARK = "AUTOLOADED_SCRIPT_RAN"
PRELOAD_MARK = "PRELOAD_RAN"

#: A gdb script section entry of kind 4 (SECTION_SCRIPT_ID_PYTHON_TEXT): its first line names it, the rest runs.
SCRIPT = ["import gdb", "from gdb.FrameDecorator import FrameDecorator", "class D(FrameDecorator):",
          "    def function(self):", f"        return '{MARK}'", "class F:", "    name = 'hostile'",
          "    priority = 100", "    enabled = True", "    def filter(self, it):", "        return map(D, it)",
          "gdb.frame_filters['hostile'] = F()", f"print('{MARK}')"]
PROGRAM = "\n".join([
    'asm(".pushsection \\".debug_gdb_scripts\\", \\"MS\\",@progbits,1\\n"',
    '    ".byte 4\\n"',
    '    ".ascii \\"gdb.inlined-script\\\\n\\"\\n"',
    *[f'    ".ascii \\"{line}\\\\n\\"\\n"' for line in SCRIPT],
    '    ".byte 0\\n"',
    '    ".popsection\\n");',
    "int main(void) { char *s = \"GfG\"; s[1] = 'n'; return 0; }",
    ""])
PRELOAD = """
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void announce(void)
{
    char exe[256] = "";
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) > 0 && strstr(exe, "gdb"))
        fprintf(stderr, "MARK\\n");
}
""".replace("MARK", PRELOAD_MARK)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The hostile program (static, symbols kept, debug info stripped but the script section kept) and the
    preload library."""
    gcc = need_tool("gcc")
    need_tool("objcopy")
    out = tmp_path_factory.mktemp("hostile")
    (out / "hostile.c").write_text(PROGRAM)
    (out / "preload.c").write_text(PRELOAD)
    subprocess.run([gcc, "-g", "-static", "-o", str(out / "full"), str(out / "hostile.c")], check=True)
    subprocess.run(["objcopy", "--strip-debug", "--keep-section=.debug_gdb_scripts", str(out / "full"),
                    str(out / "hostile")], check=True)
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(out / "preload.so"), str(out / "preload.c")], check=True)
    for path in (out, out / "hostile", out / "preload.so"):
        path.chmod(0o755)
    return {"program": out / "hostile", "preload": out / "preload.so"}


class Listener:
    """A loopback HTTP-ish listener that counts the connections made to it (a debuginfod that never answers)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def _plain_gdb(program: Path, core: Path, *iex: str, env: dict, hardened: bool = False) -> str:
    """gdb on ``program`` and ``core`` with ``iex`` commands and, with ``hardened``, corepipe's options after them."""
    gdb = need_tool("gdb")
    options = [a for x in iex for a in ("-iex", x)] + (list(HARDENING) if hardened else [])
    proc = subprocess.run([gdb, "-batch", "-nx", *options, "-ex", "bt", str(program), str(core)],
                          capture_output=True, text=True, timeout=120, env=env)
    return proc.stdout + proc.stderr


def test_a_hostile_program_cannot_make_gdb_run_code_or_reach_out(hostile: dict, listener: Listener) -> None:
    workdir = short_tempdir()
    workdir.chmod(0o755)
    program, preload = workdir / "hostile", workdir / "preload.so"
    shutil.copy2(hostile["program"], program)
    shutil.copy2(hostile["preload"], preload)  # beside the sources debug is run from, which its jail may show
    try:
        with installed_handler(workdir, config_extra=NO_RATE_LIMIT) as h:
            crash([str(program)], cwd="/")
            rec = h.wait_record(lambda r: r["comm"] == "hostile", 60)
        # At collection: the backtrace found main, and the script's frame filter did not rename it.
        frames = rec["backtrace"].get("frames") or []
        assert any(f.get("function") == "main" for f in frames), rec["backtrace"]
        assert MARK not in str(rec["backtrace"]), rec["backtrace"]

        core = workdir / "core"
        extract = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(h.config), "extract", rec["id"],
                                  "-o", str(core)], capture_output=True, text=True, timeout=120)
        assert extract.returncode == 0, extract.stderr
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
        # The attacks work on a plain gdb: the script runs, the preload loads, debuginfod is asked.
        assert MARK in _plain_gdb(program, core, "set auto-load safe-path /", env=base)
        assert PRELOAD_MARK in _plain_gdb(program, core, env=base | {"LD_PRELOAD": str(preload)})
        _plain_gdb(program, core, "set debuginfod enabled on", env=base | {"DEBUGINFOD_URLS": listener.url})
        assert listener.connections > 0, "a plain gdb with debuginfod on did not ask: the test proves nothing"
        asked = listener.connections
        # corepipe's gdb options alone undo what the plain gdb was told.
        assert MARK not in _plain_gdb(program, core, "set auto-load safe-path /", env=base, hardened=True)
        _plain_gdb(program, core, "set debuginfod enabled on", env=base | {"DEBUGINFOD_URLS": listener.url},
                   hardened=True)
        assert listener.connections == asked, "gdb with corepipe's options asked debuginfod"

        # Through corepipe debug, with all three in its environment: none takes effect.
        env = base | {"LD_PRELOAD": str(preload), "DEBUGINFOD_URLS": listener.url,
                      "PYTHONPATH": str(workdir)}
        debug = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(h.config), "debug", rec["id"], "--",
                                "-batch", "-ex", "bt"], capture_output=True, text=True, timeout=300, env=env,
                               cwd=str(workdir))
        out = debug.stdout + debug.stderr
        assert debug.returncode == 0, out
        assert "main ()" in out, out
        assert MARK not in out and PRELOAD_MARK not in out, out
        assert listener.connections == asked, "corepipe debug's gdb asked debuginfod"
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
