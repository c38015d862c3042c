"""Pipe mode with ``corepipe serve`` running, through the real kernel: the handler the kernel starts hands the
crash to the server (platform/forward.py), whose worker collects it while the kernel holds the process.

That its records are the ones the handler alone and socket mode give (apart from ``collector.transport``) is
tested with those, in test_serve_kernel.py (host, PID namespace, Docker, Podman). Here: a server that is
stopped or killed loses no crash, storms wait for a worker, the static forwarder, status and activation.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import test_serve_kernel
from runtimes import run_crasher, unique
from support import (
    CORE_PATTERN,
    NO_RATE_LIMIT,
    Handler,
    KernelSettings,
    Served,
    core_digest,
    decompress,
    installed_handler,
    need_root_kernel,
    need_tool,
    served_handler,
    set_core_limit,
    wait_for,
    wait_log,
)
from test_serve_kernel import _children, _run

from corepipe.platform import forward, procfs, static_forwarder
from corepipe.services import status

#: The fixture of test_serve_kernel, shared.
workdirs = test_serve_kernel.workdirs

def test_serve_stopped_the_handler_collects(workdirs, crasher: Path) -> None:
    """Stop the server: its socket is gone, and the next crash is collected by the handler alone."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe") as served:
        assert os.WCOREDUMP(_run([str(crasher), "0", "before-stop"]))
        before = served.wait_record(lambda r: r["comm"] == "before-stop")
        assert served.stop() == 0
        assert not served.forward_socket.exists() and not (served.run_dir / "serve.json").exists()
        assert os.WCOREDUMP(_run([str(crasher), "0", "after-stop"]))
        after = served.wait_record(lambda r: r["comm"] == "after-stop")
    assert before["collector"]["transport"] == "forwarded" and after["collector"]["transport"] == "pipe"
    assert before["core"]["stored"] and after["core"]["stored"] and after["status"] == "complete"


def _first_record(served: object, comm: str) -> dict:
    return wait_for(lambda: next((r for r in served.records() if r["comm"] == comm), None), 60,
                    f"the first record of {comm}")


def test_server_killed_mid_forward(workdirs, crasher: Path) -> None:
    """One worker streams a big core, a second crash waits in the server's queue (the kernel holding it);
    SIGKILL the server: the worker finishes its core, the guardian records the queued crash from the
    journal (without its core: the kernel ended that dump when the server's fds closed), and nothing
    partial looks complete."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe", extra=("--workers", "1")) as served:
        big = subprocess.Popen([str(crasher), "256", "big"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        assert _first_record(served, "big")["status"] == "collecting"
        queued = subprocess.Popen([str(crasher), "0", "queued"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        wait_for(lambda: served.health()["queued"] >= 1 or list((served.run_dir / "forwarded").glob(
            str(queued.pid))), 30, "the second crash in the server's queue")
        assert list((served.run_dir / "forwarded").iterdir()), "the queued crash is journalled"
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait(30)
        assert queued.wait(60) == -signal.SIGSEGV
        assert big.wait(120) == -signal.SIGSEGV
        lost = served.wait_record(lambda r: r["comm"] == "queued", timeout=60)
        done = served.wait_record(lambda r: r["comm"] == "big", timeout=120)
        assert not list((served.run_dir / "forwarded").iterdir()), "the journal entry is gone once recorded"
    assert done["status"] == "complete" and done["core"]["stored"] and done["core"]["complete"]
    assert lost["pid"] == queued.pid and lost["core"]["stored"] is False and lost["core"]["file"] is None
    assert "died before a worker took the crash" in lost["core"]["reason"], lost["core"]
    assert not list(Path(lost["_dir"]).glob("core*"))


def test_worker_killed_mid_forward(workdirs, crasher: Path) -> None:
    """SIGKILL the server and the worker streaming a forwarded core: the record stays 'collecting' with no
    core under its final name, and the next crash is collected (by the handler alone)."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe") as served:
        health = served.health()
        big = subprocess.Popen([str(crasher), "512", "big"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        assert _first_record(served, "big")["status"] == "collecting"
        workers = _children(served.proc.pid) - {health["guardian"], health["metrics"]}
        os.kill(served.proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        served.proc.wait(30)
        big.wait(120)
        [left] = [r for r in served.records() if r["comm"] == "big"]
        assert left["status"] == "collecting" and left["core"]["stored"] is False
        assert not (Path(left["_dir"]) / "core.zst").exists()
        assert os.WCOREDUMP(_run([str(crasher), "0", "after-kill"]))
        rec = served.wait_record(lambda r: r["comm"] == "after-kill")
    assert rec["status"] == "complete" and rec["core"]["stored"] and rec["collector"]["transport"] == "pipe"


def test_a_crash_waits_for_a_worker_up_to_the_deadline(workdirs, crasher: Path) -> None:
    """One worker busy with a big core; a crash handed over meanwhile waits (the kernel holding it) and is kept
    whole when the wait is within --forward-wait, recorded without its core, saying so, when it is not."""
    for wait, comm in ((120, "waited"), (0.2, "late")):
        with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe",
                            extra=("--workers", "1", "--forward-wait", str(wait))) as served:
            big = subprocess.Popen([str(crasher), "256", "big"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
            _first_record(served, "big")
            status = _run([str(crasher), "0", comm])
            rec = served.wait_record(lambda r, comm=comm: r["comm"] == comm, timeout=120)
            big.wait(120)
        assert rec["collector"]["transport"] == "forwarded" and rec["status"] == "complete"
        if comm == "waited":
            assert os.WCOREDUMP(status) and rec["core"]["stored"] and rec["core"]["complete"], rec["core"]
        else:
            assert rec["core"]["stored"] is False and rec["core"]["reason"].startswith(
                "the crash waited more than 0.2 s for a worker"), rec["core"]
            assert rec["container"]["runtime"] == "host", "identified while the kernel held it"


def test_health_says_pipe_mode(workdirs) -> None:
    with served_handler(workdirs(), mode="pipe") as served:
        health = json.loads((served.run_dir / "serve.json").read_text())
    assert health["mode"] == "pipe" and health["socket"] is None
    assert health["forward_socket"] == str(served.forward_socket)
    assert health["guardian"], "a guardian records what a killed server held"


FORWARDER = Path(static_forwarder.SOURCE)


def _build_forwarder(workdir: Path, socket: Path, handler: Path, name: str = "f") -> Path:
    """The static forwarder built as CI builds it, pointed at this test's server socket and Python handler."""
    gcc = need_tool("gcc")
    out = workdir / name
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", f'-DCOREPIPE_FORWARD_SOCKET="{socket}"',
                    f'-DCOREPIPE_HANDLER="{handler}"', "-o", str(out), str(FORWARDER)], check=True)
    headers = subprocess.run([need_tool("readelf"), "-l", str(out)], capture_output=True, text=True, check=True).stdout
    assert "INTERP" not in headers, "statically linked: no program interpreter"
    return out


def _forwarder_pattern(handler: object, forwarder: Path) -> str:
    from corepipe.platform.kernel import build_pattern

    return build_pattern(str(forwarder), str(handler.config))


def test_static_forwarder_hands_a_container_crash_to_serve(workdirs, docker_image: str) -> None:
    """The C forwarder as the pattern's program, serve in pipe mode: a Docker crash is collected by the server
    with its container identified and its core whole."""
    need_tool("docker")
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe") as served:
        forwarder = _build_forwarder(served.workdir, served.forward_socket, served.launcher)
        served.settings.set(_forwarder_pattern(served, forwarder))
        name = unique("corepipe-33-static")
        try:
            cid = run_crasher("docker", name, docker_image)
            rec = served.wait_record(lambda r: r["container"]["id"] == cid)
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert rec["collector"]["transport"] == "forwarded" and rec["collector"]["errors"] == []
    assert rec["container"]["runtime"] == "docker" and rec["container"]["name"] == name
    assert rec["status"] == "complete" and rec["core"]["stored"] and rec["core"]["complete"]


def test_static_forwarder_without_serve(workdirs, crasher: Path) -> None:
    """No server: the forwarder executes the Python handler, which collects alone; with no handler either,
    the kernel log says the core was dropped."""
    with installed_handler(workdirs(), config_extra=NO_RATE_LIMIT) as handler:
        forwarder = _build_forwarder(handler.workdir, handler.forward_socket, handler.launcher)
        handler.settings.set(_forwarder_pattern(handler, forwarder))
        assert os.WCOREDUMP(_run([str(crasher), "0", "fwd-alone"]))
        rec = handler.wait_record(lambda r: r["comm"] == "fwd-alone")
        assert rec["collector"]["transport"] == "pipe" and rec["core"]["stored"] and rec["core"]["complete"]
        assert rec["process"]["pidfd"] == "verified", "the pidfd passed through the exec"
        nothing = _build_forwarder(handler.workdir, handler.forward_socket, handler.workdir / "absent", "g")
        handler.settings.set(_forwarder_pattern(handler, nothing))
        crashed = subprocess.Popen([str(crasher), "0", "fwd-none"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        line = wait_log(f"the core of pid {crashed.pid} is dropped")
        crashed.wait(30)
    assert "no corepipe serve at" in line[0] and "start corepipe serve" in line[0]


def _server_that(answer: bytes, sock_path: Path, seen: list) -> threading.Thread:
    """A stand-in server on ``sock_path`` for one handoff: it takes the message and the fds, answers ``answer``
    (nothing: silent) and waits for the forwarder to close the connection; it never reads the pipe."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    listener.bind(str(sock_path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.settimeout(30)
            _msg, fds, _flags, _addr = socket.recv_fds(conn, forward.MAX_MESSAGE, forward.MAX_FDS)
            if answer:
                conn.send(answer)
            seen.append(conn.recv(16))  # b"": the forwarder went without GO
            for fd in fds:
                os.close(fd)
        sock_path.unlink()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_static_forwarder_with_a_silent_or_busy_server(workdirs, crasher: Path) -> None:
    """A server that does not answer within the forwarder's second, or answers busy: the static forwarder
    executes the Python handler, which collects the crash alone, core and all; the server saw no GO."""
    with installed_handler(workdirs(), config_extra=NO_RATE_LIMIT) as handler:
        forwarder = _build_forwarder(handler.workdir, handler.forward_socket, handler.launcher)
        handler.settings.set(_forwarder_pattern(handler, forwarder))
        for answer, comm in ((b"", "fwd-silent"), (forward.BUSY + b"saturated", "fwd-busy")):
            seen: list = []
            thread = _server_that(answer, handler.forward_socket, seen)
            assert os.WCOREDUMP(_run([str(crasher), "0", comm]))
            rec = handler.wait_record(lambda r, comm=comm: r["comm"] == comm)
            thread.join(30)
            assert seen == [b""], f"{comm}: the forwarder must close without GO"
            assert rec["collector"]["transport"] == "pipe" and rec["core"]["stored"] and rec["core"]["complete"]


def test_silent_handlers_do_not_hold_up_the_others(workdirs, crasher: Path) -> None:
    """Root connections that send nothing (handlers the scheduler has not run yet, in a storm) do not keep a
    real crash's handler waiting past its deadline: it is forwarded, and the silent ones are dropped later."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe") as served:
        silent = []
        try:
            for _ in range(2 * int(forward.ACK_SECONDS / 0.25) + 4):  # the old loop waited 0.5 s on each
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.connect(str(served.forward_socket))
                silent.append(sock)
            assert os.WCOREDUMP(_run([str(crasher), "0", "behind-silent"]))
            rec = served.wait_record(lambda r: r["comm"] == "behind-silent")
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: served.health()["stats"]["forwarded"] == 1, 10, "the forwarded count")
    assert rec["collector"]["transport"] == "forwarded" and rec["core"]["stored"]


def test_a_worker_forked_mid_handoff_holds_none_of_its_fds(workdirs, crasher: Path) -> None:
    """A worker forked while a handoff waits for its GO (the spare forked when a real crash is dispatched) holds
    no copy of that handoff's pipe: once its handler goes without GO, and the server drops its own copies, the
    pipe has no reader left (one in an idle worker would hold the crashed process until that worker's crash)."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe") as served:
        named = subprocess.Popen(["sleep", "60"])  # the process the handoff names (its journal entry's)
        read, write = os.pipe()
        argv = ["--config", str(served.config), str(named.pid), "1", str(named.pid), "0", "0", "11", "1700000000",
                "0", "1", "", "host", "mid-handoff"]
        handler = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            handler.settimeout(10)
            handler.connect(str(served.forward_socket))
            socket.send_fds(handler, [forward.MAGIC + b"\0".join(os.fsencode(a) for a in argv)], [read])
            os.close(read)
            assert handler.recv(16) == forward.ACCEPT
            assert os.WCOREDUMP(_run([str(crasher), "0", "forks-a-spare"]))
            served.wait_record(lambda r: r["comm"] == "forks-a-spare")  # dispatched: its replacement forked
            handler.close()  # no GO: the crash stays the handler's

            def no_reader() -> bool:
                try:
                    os.write(write, b"x")
                except BrokenPipeError:
                    return True
                return False

            wait_for(no_reader, 10, "the handoff's pipe without a reader (server and workers)")
            assert not (served.run_dir / "forwarded" / str(named.pid)).exists(), "its journal entry went"
        finally:
            handler.close()
            os.close(write)
            named.kill()
            named.wait()


def _reads(pid: int) -> int:
    """The read syscalls of ``pid`` so far (/proc/PID/io's syscr): each turn of serve's loop reads its wake-up
    pipe at least once, so their count says how often the loop went round."""
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/io").read_text().splitlines()
                    if line.startswith("syscr:")))


def test_a_full_handoff_table_does_not_spin_the_loop(workdirs, crasher: Path) -> None:
    """With --queue-limit handoffs open (silent root connections) the next connections wait in the listener's
    backlog without waking the accept loop: it sleeps as when idle, instead of going round without pause (a
    CPU taken from the handlers it waits for, in a storm). Once they go, the next crash is forwarded."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe", extra=("--queue-limit", "2")) as served:
        pid = served.health()["pid"]
        silent = []
        try:
            for _ in range(3):  # two open handoffs, the third in the backlog
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.connect(str(served.forward_socket))
                silent.append(sock)
            time.sleep(0.5)
            before = _reads(pid)
            time.sleep(3)  # idle, the loop wakes every HEARTBEAT (2 s); spinning, thousands of times
            turns = _reads(pid) - before
        finally:
            for sock in silent:
                sock.close()
        assert turns < 50, f"the accept loop went round {turns} times in 3 s with nothing to do"
        assert os.WCOREDUMP(_run([str(crasher), "0", "after-full"]))
        rec = served.wait_record(lambda r: r["comm"] == "after-full")
    assert rec["collector"]["transport"] == "forwarded" and rec["core"]["stored"]


def test_another_installations_handler_is_not_taken(workdirs, crasher: Path) -> None:
    """A handler whose --config is not the server's (a test's, another installation's) is told to collect its
    crash itself: into its own store, never the server's."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe") as served:
        other = Handler(workdirs(), config_extra=NO_RATE_LIMIT, forward=served.forward_socket)
        served.settings.set(other.pattern())
        assert os.WCOREDUMP(_run([str(crasher), "0", "foreign"]))
        rec = other.wait_record(lambda r: r["comm"] == "foreign")
        assert not served.store.exists() or not [r for r in served.records() if r["comm"] == "foreign"]
        wait_for(lambda: served.health()["stats"]["forward_refused"] == 1, 10, "the refusal in the server's counts")
    assert rec["collector"]["transport"] == "pipe" and rec["core"]["stored"]


def test_status_says_which_transport_collects(workdirs) -> None:
    """status: "forwarded" while a pipe-mode server of this installation runs, "pipe" once it stopped."""
    with served_handler(workdirs(), mode="pipe") as served:
        state = {"pattern": served.pattern(), "bin": str(served.launcher)}
        facts = status.forwarding(served.health() | {"alive": True}, state["bin"])
        assert facts == {"works": True, "socket": str(served.forward_socket), "problem": None}
        served.stop()
        facts = status.forwarding(None, state["bin"])
        assert not facts["works"] and "not running" in facts["problem"]


def test_socket_activation_in_pipe_mode(workdirs, crasher: Path) -> None:
    """Started the way corepipe-forward.socket starts it (LISTEN_FDS, a seqpacket socket): the first handoff
    starts the server, which collects that crash and leaves the socket, systemd's, in place when it stops."""
    activate = need_tool("systemd-socket-activate")
    need_root_kernel()
    served = Served(workdirs(), config_extra=NO_RATE_LIMIT)
    served.run_dir.mkdir()
    with KernelSettings() as settings:
        settings.set(served.pattern())
        served.proc = subprocess.Popen([activate, "--seqpacket", "-l", str(served.forward_socket), str(served.launcher),
                                        "serve", "--config", str(served.config), "--mode", "pipe", "--run-dir",
                                        str(served.run_dir / "elsewhere")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(served.forward_socket.exists, 30, "the activator's socket")
            assert os.WCOREDUMP(_run([str(crasher), "0", "activated"]))
            served.wait_record(lambda r: r["comm"] == "activated", timeout=60)  # by the server or the handler
            wait_for((served.run_dir / "elsewhere" / "serve.json").exists, 30, "the server's health file")
            assert os.WCOREDUMP(_run([str(crasher), "0", "activated-2"]))
            rec = served.wait_record(lambda r: r["comm"] == "activated-2", timeout=60)
            health = json.loads((served.run_dir / "elsewhere" / "serve.json").read_text())
        finally:
            served.proc.terminate()
            served.proc.wait(60)
    assert health["forward_activated"] is True and health["forward_socket"] == str(served.forward_socket)
    assert rec["status"] == "complete" and rec["core"]["stored"] and rec["collector"]["transport"] == "forwarded"


NODE_SH = Path(__file__).resolve().parents[2] / "install" / "kubernetes" / "node.sh"


def _pod_env(d: Path, state: Path) -> dict:
    """node.sh's environment in forward mode for a pod whose files are under ``d``, remembering in ``state``."""
    built = d / "built"
    if not built.exists():
        _build_forwarder(d, forward.socket_path(str(d / "run")), d / "absent", "built")
    return {"PATH": os.environ["PATH"], "COREPIPE_MODE": "forward", "COREPIPE_PYTHON": sys.executable,
            "COREPIPE_POD_CONFIG": f"{d}/c.toml", "COREPIPE_STORE": f"{d}/store", "COREPIPE_FORWARDER_DIR": f"{d}/f",
            "COREPIPE_FORWARDER": str(built), "COREPIPE_RUN_DIR": f"{d}/run", "COREPIPE_POD_STATE": str(state),
            "COREPIPE_SERVE_ARGS": "--forward-wait 60"}


def _start_pod(d: Path, env: dict, settings: KernelSettings) -> subprocess.Popen:
    """node.sh as the pod's command (its own process group, as a container's processes), once its server runs
    and the kernel's pattern names its forwarder."""
    pod = subprocess.Popen(["sh", str(NODE_SH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    settings.undo_on_abort(["kill", "-TERM", str(pod.pid)])
    wait_for(lambda: CORE_PATTERN.read_text().startswith(f"|{d}/f/corepipe-forward collect ")
             and _server_of(d / "run", pod.pid), 60, "the forwarder's pattern and the pod's server")
    return pod


def test_daemonset_forward_mode(workdirs, docker_image: str) -> None:
    """install/kubernetes/node.sh in forward mode, run as the pod runs it (here on the host itself: the test
    image has no Python): the forwarder is copied to the forwarder directory, the kernel's pattern names it,
    the server runs in pipe mode and collects a Docker crash; SIGTERM puts the kernel's settings back."""
    need_tool("docker")
    need_root_kernel()
    d = workdirs()
    env = _pod_env(d, d)
    name = unique("corepipe-33-node")
    with KernelSettings() as settings:
        before = CORE_PATTERN.read_text()
        pod = _start_pod(d, env, settings)
        try:
            assert Path("/proc/sys/kernel/core_pipe_limit").read_text().strip() == "256"
            cid = run_crasher("docker", name, docker_image)
            rec = wait_for(lambda: next((r for r in map(json.loads, map(Path.read_text, (d / "store").rglob(
                "record.json"))) if r["container"]["id"] == cid and r["status"] != "collecting"), None), 60,
                "the container's record in the pod's store")
        finally:
            pod.terminate()
            out, _ = pod.communicate(timeout=120)
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        assert pod.returncode == 0, out
        assert CORE_PATTERN.read_text() == before, "SIGTERM put the kernel's pattern back"
    assert rec["collector"]["transport"] == "forwarded" and rec["container"]["runtime"] == "docker"
    assert rec["status"] == "complete" and rec["core"]["stored"] and rec["core"]["complete"]


def test_daemonset_forward_mode_after_a_killed_pod(workdirs) -> None:
    """A pod killed outright (OOM, SIGKILL) leaves the forwarder's pattern behind. Its restarted container finds
    what it saved on the node's /run and puts back the pattern from before the first pod; one that finds nothing
    saved (state lost) never takes the dead pod's forwarder for the pattern to put back; one that finds a
    pattern of the node's own again (set after the kill: what was saved is stale) puts back that one."""
    need_root_kernel()
    d = workdirs()
    with KernelSettings() as settings:
        settings.set(f"{d}/core.%p")  # a pattern of the node's own, not the kernel's default
        before, admins = CORE_PATTERN.read_text(), f"{d}/admin.%p"
        for case, restored, limit in (("kept", before, "64\n"), ("lost", "core\n", "0\n"),
                                      ("changed", admins + "\n", "16\n")):
            state = d / case
            state.mkdir()
            pod = _start_pod(d, _pod_env(d, state), settings)
            os.killpg(pod.pid, signal.SIGKILL)
            pod.wait(30)
            wait_for(lambda pgid=pod.pid: not _group_alive(pgid), 30, "every process of the killed pod gone")
            assert CORE_PATTERN.read_text().startswith(f"|{d}/f/corepipe-forward collect "), "left behind"
            if case == "lost":
                state = d / "lost-again"  # the restarted container finds nothing saved
                state.mkdir()
            if case == "changed":
                settings.set(admins, pipe_limit=16)  # the node's admin, finding the forwarder's pattern
            pod = _start_pod(d, _pod_env(d, state), settings)
            pod.terminate()
            out, _ = pod.communicate(timeout=120)
            assert pod.returncode == 0, out
            assert CORE_PATTERN.read_text() == restored, f"{case}: {out}"
            assert Path("/proc/sys/kernel/core_pipe_limit").read_text() == limit, case
            settings.set(before.rstrip("\n"))


def _server_of(run_dir: Path, pod: int) -> bool:
    """The server whose health file is in ``run_dir`` runs, started by ``pod`` (not an earlier pod's file)."""
    try:
        pid = json.loads((run_dir / "serve.json").read_text())["pid"]
        stat = procfs.read(pid, "stat")
    except (OSError, ValueError, KeyError):
        return False
    return procfs.stat_field(stat, 4) == pod  # its parent


def _group_alive(pgid: int) -> bool:
    """A process of group ``pgid`` still runs (a zombie does not count)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = procfs.read(pid, "stat")
        except OSError:
            continue
        if procfs.stat_field(stat, 5) == pgid and not procfs.exited(stat):
            return True
    return False


def test_server_killed_mid_storm(workdirs, crasher: Path, tmp_path: Path) -> None:
    """16 crashes handed over at once to a server with one worker; SIGKILL the server (not its workers) once the
    first is stored: every crash is recorded (by the workers that had them, the guardian for the queued ones,
    the handler alone for those that came after), and every stored core is whole."""
    with served_handler(workdirs(), config_extra=NO_RATE_LIMIT, mode="pipe", extra=("--workers", "1")) as served:
        crashes = [subprocess.Popen([str(crasher), "8", f"st{n}"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
                   for n in range(16)]
        wait_for(lambda: any(r["status"] == "complete" for r in served.records()) if served.store.exists() else
                 False, 120, "the first stored crash")
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait(30)
        for proc in crashes:
            assert proc.wait(120) == -signal.SIGSEGV
        recs = wait_for(lambda: (lambda rs: rs if len(rs) == 16 else None)(
            [r for r in served.records() if r["status"] != "collecting"]), 120, "16 final records")
    assert {r["comm"] for r in recs} == {f"st{n}" for n in range(16)}
    assert {r["collector"]["transport"] for r in recs} <= {"forwarded", "pipe"}
    for rec in recs:
        assert rec["status"] == "complete", rec["collector"]["errors"]
        core = Path(rec["_dir"]) / "core.zst"
        assert core.exists() == rec["core"]["stored"], rec["core"]
        if rec["core"]["stored"]:
            assert rec["core"]["complete"] and core_digest(decompress(core, tmp_path / "c")) == rec["core"]["digest"]
        else:
            assert "died before a worker took the crash" in rec["core"]["reason"], rec["core"]
