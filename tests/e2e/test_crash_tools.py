"""list / info / extract / debug / rm on crashes collected through the real kernel.

The container case uses a dynamically linked crasher whose libraries exist only in its image:
``debug`` runs after the container and the image are deleted, so gdb can only resolve them
through the copies corepipe saved at collection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runtimes import docker_import, make_rootfs, unique
from support import CRASH_LINE, HERE, Handler, KernelSettings, core_digest, crash, need, need_root_kernel, need_tool

from corepipe.commands.output import human_size

RAISE_LINE = next(i for i, line in enumerate((HERE / "crasher.c").read_text().splitlines(), 1)
                  if "raise(atoi" in line)


def corepipe(handler, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``corepipe ARGS`` with the handler's config and a temporary directory of this test's own (TMPDIR)."""
    temp = handler.workdir / "tmp"
    temp.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(handler.config), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def dynamic_crasher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    need(gcc is not None, "needs gcc to build the test crasher")
    out = tmp_path_factory.mktemp("dyn") / "crasher-dyn"
    subprocess.run([gcc, "-g", "-O0", "-o", str(out), str(HERE / "crasher.c")], check=True)
    return out


@pytest.fixture(scope="module")
def dynamic_image(tmp_path_factory: pytest.TempPathFactory, dynamic_crasher: Path) -> str:
    """busybox + the dynamic crasher + the loader and libraries ldd names, at the same paths; deleted by the test."""
    root = make_rootfs(tmp_path_factory.mktemp("dynroot"), dynamic_crasher)
    ldd = subprocess.run(["ldd", str(dynamic_crasher)], capture_output=True, text=True, check=True).stdout
    libraries = re.findall(r"(/\S+) \(0x", ldd)
    assert any("libc.so" in lib for lib in libraries), ldd
    for lib in libraries:
        target = root / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, target)  # follows the host's symlinks: a real file in the image
    name = docker_import(root, unique("corepipe-5-dyn") + ":1")
    yield name
    subprocess.run(["docker", "rmi", "-f", name], capture_output=True)


def _docker_crash(image: str, *command: str) -> str:
    """Run a command in a new container; returns its id after removing the container."""
    name = unique("corepipe-5")
    try:
        run = subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1", image,
                              *command], capture_output=True, text=True, timeout=120)
        assert run.returncode in (128 + signal.SIGSEGV, 128 + signal.SIGABRT), run.stderr
        return subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                              check=True).stdout.strip()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def _check_extract(handler, rec: dict, tmp_path: Path) -> None:
    out = tmp_path / f"core-{rec['id']}"
    corepipe(handler, "extract", rec["id"][:6], "-o", str(out))
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF" and len(data) == rec["core"]["size"]
    assert core_digest(data) == rec["core"]["digest"]
    assert out.stat().st_mode & 0o777 == 0o600
    piped = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(handler.config), "extract", rec["id"]],
                           capture_output=True, timeout=300)
    assert piped.returncode == 0 and piped.stdout == data, piped.stderr


def test_container_debuggable_after_container_and_image_are_gone(kernel_handler, dynamic_image: str,
                                                                 tmp_path: Path) -> None:
    need_tool("gdb")
    segv_cid = _docker_crash(dynamic_image, "/crasher")
    # Not as PID 1, which the kernel shields from raise(SIGABRT): under a shell that waits for it.
    abrt_cid = _docker_crash(dynamic_image, "sh", "-c", f"/crasher 0 aborter {int(signal.SIGABRT)}; exit $?")
    subprocess.run(["docker", "rmi", "-f", dynamic_image], check=True, capture_output=True)
    assert subprocess.run(["docker", "image", "inspect", dynamic_image], capture_output=True).returncode != 0
    segv = kernel_handler.wait_record(lambda r: r["container"]["id"] == segv_cid)
    abrt = kernel_handler.wait_record(lambda r: r["container"]["id"] == abrt_cid and r["comm"] == "aborter")

    files = {entry["path"]: entry for entry in segv["binaries"]["files"]}
    assert files["/crasher"]["exe"] is True and files["/crasher"]["stored"] is True
    libc = next(entry for path, entry in files.items() if "libc.so" in path)
    assert libc["stored"] is True and re.fullmatch(r"[0-9a-f]{40}", libc["build_id"])
    # Deduplicated: both crashes use the one saved libc.
    assert {e["build_id"] for e in abrt["binaries"]["files"] if "libc.so" in e["path"]} == {libc["build_id"]}
    assert len(list((kernel_handler.store / ".build-id" / libc["build_id"][:2]).glob(libc["build_id"][2:] + "-*"))) == 1

    listed = json.loads(corepipe(kernel_handler, "list", "--json", "--container", segv_cid[:12]).stdout)
    assert [item["id"] for item in listed] == [segv["id"]]
    assert listed[0]["core_state"] == "present" and listed[0]["path"] == segv["_dir"]
    table = corepipe(kernel_handler, "list").stdout
    assert segv["id"] in table and abrt["id"] in table

    info = corepipe(kernel_handler, "info", segv["id"]).stdout
    assert f"container.id:        {segv_cid}" in info
    assert segv["backtrace"]["tool"] == "gdb" and segv["backtrace"]["error"] is None, segv["backtrace"]
    assert "main (" in info and f"crasher.c:{CRASH_LINE}" in info, info

    _check_extract(kernel_handler, segv, tmp_path)

    debug = corepipe(kernel_handler, "debug", segv["id"], "--", "-batch", "-ex", "bt", "-ex", "info sharedlibrary")
    out = debug.stdout + debug.stderr
    assert " main " in out and f"crasher.c:{CRASH_LINE}" in out, out
    assert "Could not load shared library symbols" not in out, out
    libs = [line for line in out.splitlines() if "libc.so" in line and line.startswith("0x")]
    # Loaded from debug's sysroot, whose only entries are links to the saved copies.
    assert libs and all(re.search(r"/corepipe-debug-[^/]+/root/", line) for line in libs), out

    # A frame inside the saved libc resolves to a libc symbol; main is the caller at the raise() line.
    debug = corepipe(kernel_handler, "debug", abrt["id"], "--", "-batch", "-ex", "bt")
    out = debug.stdout + debug.stderr
    assert re.search(r"#\d+ .* in (__GI_)?raise ", out) and f"crasher.c:{RAISE_LINE}" in out, out
    assert not list((kernel_handler.workdir / "tmp").glob("corepipe-debug-*/core")), "debug left a core behind"


def test_host_process(kernel_handler, dynamic_crasher: Path, tmp_path: Path) -> None:
    need_tool("gdb")
    crash([str(dynamic_crasher), "0", "hostcrash"])
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "hostcrash")
    assert rec["container"]["runtime"] == "host"
    # Host processes: build-ids and paths only by default (binaries_host = false).
    exe = next(entry for entry in rec["binaries"]["files"] if entry["exe"])
    assert exe["path"] == str(dynamic_crasher) and exe["stored"] is False
    expected = subprocess.run(["readelf", "-n", str(dynamic_crasher)], capture_output=True, text=True).stdout
    assert f"Build ID: {exe['build_id']}" in expected

    listed = corepipe(kernel_handler, "list", "--exe", "crasher-dyn").stdout.splitlines()
    assert listed[0].split("\t")[0] == "ID" and len(listed) == 2
    fields = listed[1].split("\t")
    assert fields[0] == rec["id"] and fields[2] == "host" and fields[5] == "SIGSEGV" and fields[9] == "present"
    # SIZE is the core as the process had it, STORED what it takes compressed.
    assert fields[7:9] == [human_size(rec["core"]["size"]), human_size(rec["core"]["compressed_size"])], fields

    info = corepipe(kernel_handler, "info", rec["id"][:5]).stdout
    assert f"crasher.c:{CRASH_LINE}" in info and "backtrace (gdb" in info, info
    _check_extract(kernel_handler, rec, tmp_path)

    debug = corepipe(kernel_handler, "debug", rec["id"], "--", "-batch", "-ex", "bt")
    out = debug.stdout + debug.stderr
    assert " main " in out and f"crasher.c:{CRASH_LINE}" in out, out

    corepipe(kernel_handler, "rm", rec["id"])
    assert not Path(rec["_dir"]).exists()
    gone = corepipe(kernel_handler, "info", rec["id"], check=False)
    assert gone.returncode == 1 and f"no crash with id {rec['id']}" in gone.stderr


def test_backtrace_and_binaries_switches(handler_dir: Path, dynamic_crasher: Path) -> None:
    """Over backtrace_max_core_size: the failure is recorded and the core still stored; binaries = false."""
    need_root_kernel()
    need_tool("gdb")
    handler = Handler(handler_dir, "backtrace_max_core_size = 1\nbinaries = false\n")
    with KernelSettings() as settings:
        settings.set(handler.pattern())
        crash([str(dynamic_crasher), "0", "bounded"])
        rec = handler.wait_record(lambda r: r["comm"] == "bounded")
    assert rec["status"] == "complete" and rec["core"]["stored"] is True
    assert "over backtrace_max_core_size" in rec["backtrace"]["error"] and rec["backtrace"]["text"] is None
    assert "binaries" not in rec
    info = corepipe(handler, "info", rec["id"]).stdout
    assert "error: core of" in info and "over backtrace_max_core_size" in info
