"""A crashed process whose files are served by a FUSE server that never answers (issue 14, item 2).

The server (tests/fuse_blocker.c, libfuse 3) answers the victim's own open and the first page, and
nothing after that. The victim (tests/fuse_victim.c) maps the file, maps an unread page of it over
its own command line and crashes: opening its map_files entry or reading the file would each wait
on the server, where SIGALRM cannot end the wait (reading its /proc/<pid>/cmdline would too on a
kernel older than 4.18, which did not yet refuse file-backed pages there). The crash must
still be recorded, with the core, within the handler's own bounds: by ``corepipe collect`` (pipe
mode) and by ``corepipe serve`` (socket mode) alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    HERE,
    Handler,
    KernelSettings,
    installed_handler,
    need,
    need_tool,
    read_line,
    served_handler,
    start_crash,
    wait_for,
)

from corepipe.platform import memread, sandbox


@pytest.fixture(scope="module")
def fuse_programs(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    gcc = need_tool("gcc")
    need(shutil.which("pkg-config") is not None and subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode
         == 0, "needs libfuse3-dev (tests/setup.sh installs it)")
    need(Path("/dev/fuse").exists(), "needs /dev/fuse")
    d = tmp_path_factory.mktemp("fuse")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                           check=True).stdout.split()
    subprocess.run([gcc, "-O1", "-o", str(d / "fuse_blocker"), str(HERE / "fuse_blocker.c"), *flags], check=True)
    subprocess.run([gcc, "-O0", "-o", str(d / "fuse_victim"), str(HERE / "fuse_victim.c")], check=True)
    return d / "fuse_blocker", d / "fuse_victim"


@pytest.fixture(params=["pipe", "socket"])
def handler(request: pytest.FixtureRequest, handler_dir: Path) -> Iterator[Handler]:
    """corepipe collect as the kernel's pipe handler, or corepipe serve on its coredump socket."""
    if request.param == "pipe":
        with installed_handler(handler_dir) as installed:
            yield installed
    else:
        with served_handler(handler_dir) as served:
            yield served


def test_a_fuse_backed_mapping_cannot_hang_the_handler(handler: Handler, fuse_programs: tuple) -> None:
    server, victim = fuse_programs
    mount = handler.workdir / "mnt"
    mount.mkdir()
    proc = subprocess.Popen([str(server), str(mount)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    handler.settings.undo_on_abort(["umount", "-l", str(mount)])  # should this process die inside
    handler.settings.undo_on_abort(["kill", "-9", str(proc.pid)])
    try:
        wait_for(lambda: (mount / "blocker").exists() or proc.poll() is not None, 30, "the FUSE mount")
        assert proc.poll() is None, proc.stderr.read()
        crashed = start_crash([str(victim), str(mount / "blocker"), "x" * 16384], stdout=subprocess.PIPE)
        assert read_line(crashed.stdout) == b"ready\n"
        crashed.wait(timeout=60)
        # Final within the deadline, while the server still answers nothing: the handler did not wait on it.
        rec = handler.wait_record(lambda r: r["comm"] == "fuse_victim", timeout=60)
    finally:
        proc.kill()  # aborts the FUSE connection: anything still waiting on it gets an error
        proc.wait()
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
    assert rec["core"]["stored"] is True, rec["core"]
    # Linux reads cmdline only from anonymous memory: it stops at the FUSE page; an older kernel would wait
    # on it, and the reading child is killed at MEMORY_SECONDS.
    cut = [a for a in rec["cmdline"] if set(a) == {"x"}]
    assert len(cut) == 1 and len(cut[0]) < 16384 or any(e.startswith("cmdline: timed out")
                                                        for e in rec["process"]["errors"]), rec["cmdline"]
    assert rec["exe"] == str(victim)
    errors = rec["binaries"]["errors"]
    assert any(e.startswith(f"{mount / 'blocker'}: not opened: device") for e in errors), errors
    # The backtrace ran in the debugger sandbox, under a uid of its own (both modes).
    assert sandbox.UID_RANGE[0] <= rec["backtrace"]["uid"] <= sandbox.UID_RANGE[1], rec["backtrace"]


def test_a_read_that_blocks_in_fuse_is_killed(handler_dir: Path, fuse_programs: tuple) -> None:
    """memread.read_in_child, which the handler uses for /proc files read from the process's memory, on a
    file whose open never returns: the child is killed at the deadline and the caller goes on."""
    need(os.geteuid() == 0, "needs root to mount a FUSE filesystem")
    server, _victim = fuse_programs
    mount = handler_dir / "mnt"
    mount.mkdir()
    with KernelSettings() as settings:  # for its watchdog: the mount goes even if this process is killed
        proc = subprocess.Popen([str(server), str(mount)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        settings.undo_on_abort(["umount", "-l", str(mount)])
        settings.undo_on_abort(["kill", "-9", str(proc.pid)])
        files, errors = _read_blocking(proc, mount)
    assert files == {} and errors["blocker"].startswith("timed out"), (files, errors)


def _read_blocking(proc: subprocess.Popen, mount: Path) -> tuple:
    try:
        wait_for(lambda: (mount / "blocker").exists() or proc.poll() is not None, 30, "the FUSE mount")
        first = os.open(mount / "blocker", os.O_RDONLY)  # the one open the server answers
        os.close(first)
        dir_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return memread.read_in_child(dir_fd, ("blocker",), 4096, 1)
        finally:
            os.close(dir_fd)
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


#: Mounts the blocking FUSE filesystem, an overlay whose lower layer it is (upper and work on a tmpfs), and runs
#: the victim on the overlay's file, all in the mount namespace ``unshare`` made. The server's PID goes to a file.
OVERLAY_SCRIPT = """set -e
cd "$1"
"$2" fuse >/dev/null 2>&1 &
echo $! > server.pid
i=0
while [ ! -e fuse/blocker ]; do i=$((i + 1)); [ $i -lt 300 ]; sleep 0.1; done
mount -t tmpfs tmpfs up
mkdir up/u up/w
mount -t overlay overlay -o lowerdir="$1/fuse",upperdir="$1/up/u",workdir="$1/up/w" ovl
exec "$3" ovl/blocker "$4"
"""
#: Namespaces for the overlay: a mount namespace of root's own (the overlay's layers are judged), or a user
#: namespace's, as any unprivileged user makes (unshare -Urm: its layers are that user's word).
NAMESPACES = {"root": ["--mount", "--propagation", "private"], "userns": ["--user", "--map-root-user", "--mount"]}


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_a_fuse_layer_behind_an_overlay_cannot_hang_the_handler(handler: Handler, fuse_programs: tuple,
                                                               namespace: str) -> None:
    """Issue 30, item 2: opening ``map_files/<range>`` of an overlay file opens its lower layer's, here a FUSE
    file whose server answers one open only (the victim's own). The handler must not open it: the crash is
    recorded, with its core, within the handler's bounds, and the record says the file was skipped and why."""
    need(os.geteuid() == 0, "needs root to mount a FUSE filesystem")
    unshare = need_tool("unshare")
    server, victim = fuse_programs
    work = handler.workdir / "overlay"
    for name in ("fuse", "up", "ovl"):
        (work / name).mkdir(parents=True)
    crashed = start_crash([unshare, *NAMESPACES[namespace], "sh", "-c", OVERLAY_SCRIPT, "sh", str(work), str(server),
                           str(victim), "x" * 9000], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(crashed.stdout) == b"ready\n", crashed.stderr.read()
        crashed.wait(timeout=60)  # the kernel lets it go once the handler closes its pipe
        rec = handler.wait_record(lambda r: r["comm"] == "fuse_victim", timeout=60)
    finally:
        pid = (work / "server.pid").read_text().strip() if (work / "server.pid").exists() else ""
        if pid.isdigit():
            os.kill(int(pid), 9)  # aborts the FUSE connection: anything still waiting on it gets an error
        crashed.kill()
        crashed.wait()
    assert rec["core"]["stored"] is True, rec["core"]
    errors = rec["binaries"]["errors"]
    why = ("an overlay mounted in another user namespace" if namespace == "userns"
           else f"an overlay whose layer {work / 'fuse'} is fuse.fuse_blocker, not a local filesystem")
    assert any(e.startswith(f"{work / 'ovl' / 'blocker'}: not opened: device ") and why in e for e in errors), errors
    # The executable, on the handler's own filesystem, is still held and described.
    assert rec["exe"] == str(victim), rec["exe"]
    assert [f["path"] for f in rec["binaries"]["files"] if f["exe"]] == [str(victim)], rec["binaries"]
