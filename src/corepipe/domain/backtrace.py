"""A backtrace of all threads, taken right after the core is stored (config ``backtrace``).

The core is decompressed into a nameless file (O_TMPFILE in the store root: on disk, never
visible, gone when closed) and gdb (or eu-stack) reads it in a child sandboxed by
platform/sandbox.py: a uid of its own that no other process or account has (so nobody else can
read its fds or signal it), no new privileges, a root holding only the system's read-only trees
(so no library name in the core leads anywhere else), its own session, killed at
``backtrace_timeout``. The child gets the core and the crashed process's files only as inherited
fds (a sysroot of symlinks to ``/proc/self/fd/N``), so it can read them but write nothing to the
store; the parent files its output. Cores of set-uid programs (dump mode 2, which the kernel means
for root only) get no backtrace. A failure is recorded in the result, never raised.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional
from uuid import uuid4

from corepipe.domain.binaries import HeldFiles
from corepipe.platform import gdb, sandbox, sysroot, unpack

MAX_OUTPUT = 256 * 1024
#: Frames of the crashing thread kept for the signature (domain/signature.py uses only the top few).
MAX_FRAMES = 64
_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Where the sysroot appears inside the child's root.
SYSROOT = "/sysroot"


def find_tool() -> Optional[str]:
    for name in ("gdb", "eu-stack"):
        path = shutil.which(name, path=_PATH)
        if path:
            return path
    return None


def take(store_fd: int, crash_path: str, record: dict, held: HeldFiles, *, timeout: int,
         max_core_size: int) -> Optional[dict]:
    """The ``backtrace`` record field, or None when no tool is installed."""
    tool = find_tool()
    if tool is None:
        return None
    result = {"tool": os.path.basename(tool), "text": None, "error": None, "truncated": False, "duration": None,
              "frames": None, "uid": None}
    started = time.monotonic()
    size = (record.get("core") or {}).get("size") or 0
    if size > max_core_size:
        result["error"] = f"core of {size} bytes is over backtrace_max_core_size ({max_core_size})"
        return result
    if record.get("dump_mode") == 2:
        result["error"] = "a set-uid program's core (dump mode 2) is for root only: no backtrace taken"
        return result
    core_fd = work = None
    try:
        room = os.fstatvfs(store_fd)
        if room.f_bavail * room.f_frsize < size:
            raise OSError(f"no room to decompress the {size}-byte core in the store for the backtrace")
        uid = result["uid"] = sandbox.free_uid()
        core_fd = _decompressed(store_fd, crash_path, record, uid)
        work = tempfile.mkdtemp(prefix="corepipe-bt-", dir="/tmp")
        marker = f"corepipe-frames-{uuid4().hex}: "
        text, result["truncated"], result["error"] = _run(tool, core_fd, held, work, timeout, marker, uid)
        result["text"], result["frames"] = split_frames(text, marker)
    except (OSError, subprocess.SubprocessError, unpack.CoreError) as exc:
        result["error"] = str(exc)
    finally:
        if core_fd is not None:
            os.close(core_fd)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        result["duration"] = round(time.monotonic() - started, 3)
    return result


def _decompressed(store_fd: int, crash_path: str, record: dict, uid: int) -> int:
    source = unpack.open_core(crash_path, record)
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=store_fd)
        try:
            unpack.to_fd(source, record, fd)
            os.fchown(fd, uid, uid)  # only the child (and root) can open it again, through its fd
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(source)


def _command(tool: str, core: str, exe: Optional[str], root: str, marker: str) -> list:
    if os.path.basename(tool) == "eu-stack":
        return [tool, "-s", f"--core={core}"] + ([f"--executable={exe}"] if exe else [])
    return [tool, "-batch", "-nx", *gdb.HARDENING, "-iex", f"set sysroot {root}",
            "-ex", frames_command(marker), "-ex", "thread apply all bt",
            *([exe] if exe else []), "-c", core]  # -c: without an exe, a lone core would be taken for one


# The crashing thread's frames for the signature, as one JSON line after a marker: gdb selects the thread
# that got the signal (the kernel writes it first in the core). Each frame is [pc, function name or None,
# is the signal trampoline]. The marker holds a nonce drawn for each backtrace (``take``), so text from the
# core (the command line gdb echoes, symbol names) cannot forge the line, in the resident server too.
_FRAMES_SCRIPT = """
import json
frames = []
try:
    frame = gdb.newest_frame()
    while frame is not None and len(frames) < %d:
        frames.append([frame.pc(), frame.name(), frame.type() == gdb.SIGTRAMP_FRAME])
        frame = frame.older()
except gdb.error:
    pass
print(%r + json.dumps(frames))
"""


def frames_command(marker: str) -> str:
    """The gdb command that prints the crashing thread's frames after ``marker`` (see split_frames)."""
    return "python exec(" + repr(_FRAMES_SCRIPT % (MAX_FRAMES, marker)) + ")"


def split_frames(text: str, marker: str) -> tuple:
    """(the text without the frames line, the frames as [{pc, function, sigtramp}] or None if gdb printed none)."""
    frames, kept = None, []
    for line in text.splitlines(keepends=True):
        if frames is None and line.startswith(marker):
            frames = _frames(line[len(marker):])
        else:
            kept.append(line)
    return "".join(kept), frames


def _frames(data: str) -> Optional[list]:
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, list):
        return None
    frames = []
    for entry in raw[:MAX_FRAMES]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)):
            return None
        name = entry[1] if isinstance(entry[1], str) else None
        frames.append({"pc": entry[0], "function": name, "sigtramp": entry[2] is True})
    return frames


def _run(tool: str, core_fd: int, held: HeldFiles, work: str, timeout: int, marker: str,
         uid: int) -> tuple:
    # The handler starts without stdout/stderr, so held fds may be 1 or 2, which the child's own
    # stdout/stderr would replace: hand the child copies numbered 3 and up.
    fds = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in [core_fd] + [h.fd for h in held.files]]
    try:
        return _run_child(tool, fds[0], list(zip(held.files, fds[1:])), work, timeout, marker, uid)
    finally:
        for fd in fds:
            os.close(fd)


def _run_child(tool: str, core_fd: int, files: list, work: str, timeout: int, marker: str, uid: int) -> tuple:
    root = os.path.join(work, "root")
    os.mkdir(root)
    sysroot.build(root, [(h.path, f"/proc/self/fd/{fd}") for h, fd in files], dir_mode=0o711)
    os.chmod(work, 0o711)
    exe = next((f"/proc/self/fd/{fd}" for h, fd in files if h.exe), None)
    jail = sandbox.Jail(os.path.join(work, "jail"), [(root, SYSROOT), (tool, tool)])
    jail.prepare()
    proc = subprocess.Popen(_command(tool, f"/proc/self/fd/{core_fd}", exe, SYSROOT, marker), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
                            pass_fds=[core_fd] + [fd for _h, fd in files], preexec_fn=sandbox.preexec(jail, uid),
                            env=sandbox.debugger_env({"PATH": _PATH, "HOME": "/nonexistent", "LC_ALL": "C"}))
    try:
        output, truncated, timed_out = _read(proc, time.monotonic() + timeout)
    except BaseException:  # the handler's own time limit: leave no debugger behind
        _kill(proc)
        raise
    text = output.decode("utf-8", "replace")
    if timed_out:
        return text, truncated, f"timed out after {timeout} s (backtrace_timeout)"
    if proc.returncode != 0 and not text.strip():
        return text, truncated, f"{os.path.basename(tool)} exited with status {proc.returncode}"
    return text, truncated, None


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read(proc: subprocess.Popen, deadline: float) -> tuple:
    """Up to MAX_OUTPUT bytes of the child's output; the whole session is killed at ``deadline``."""
    chunks, size, truncated = [], 0, False
    fd = proc.stdout.fileno()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                _kill(proc)
                return b"".join(chunks), truncated, True
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if size < MAX_OUTPUT:
                chunks.append(chunk[:MAX_OUTPUT - size])
                truncated = truncated or size + len(chunk) > MAX_OUTPUT
                size += len(chunk)
            else:
                truncated = True
        proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return b"".join(chunks), truncated, True
    finally:
        proc.stdout.close()
    return b"".join(chunks), truncated, False
