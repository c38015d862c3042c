"""Socket mode through the real kernel: ``corepipe serve`` on ``@@<socket>``, against the pipe handler.

Each crash is collected once by the pipe handler, once by the server on the socket and once by the server
in pipe mode (the handler hands it over); the records must have the same fields and the same identity,
and gdb must find ``main`` at the crashing line in every core.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from runtimes import image, run_crasher, unique
from support import (
    CORE_PATTERN,
    CRASH_LINE,
    NO_RATE_LIMIT,
    KernelSettings,
    Served,
    cpus_allowed,
    decompress,
    gdb_backtrace,
    holding_slots,
    installed_handler,
    need,
    need_root_kernel,
    need_tool,
    recycle_pid,
    served_handler,
    set_core_limit,
    short_tempdir,
    wait_for,
    wait_log,
)

from corepipe.domain.record import CORELESS_MAX
from corepipe.platform import sandbox, slots
from corepipe.services import install, status


@pytest.fixture
def workdirs() -> Callable[[], Path]:
    made: list = []

    def make() -> Path:
        path = short_tempdir()
        path.chmod(0o755)
        made.append(path)
        return path
    yield make
    for path in made:
        subprocess.run(["rm", "-rf", str(path)], check=False)


#: How a crash is collected: the pipe handler alone, serve on the coredump socket, and pipe mode with serve
#: running (the handler hands the crash over: docs/forwarding.md).
MODES = {"pipe": (installed_handler, {}), "socket": (served_handler, {}),
         "forwarded": (served_handler, {"mode": "pipe"})}


def _both(workdirs: Callable[[], Path], run: Callable[[str], object], match: Callable[[dict, object], bool],
          config: str = NO_RATE_LIMIT) -> tuple:
    """(pipe, socket, forwarded) records of the same crash, ``run(mode)`` crashing it once in each of MODES."""
    records = {}
    for mode, (handler, options) in MODES.items():
        with handler(workdirs(), config_extra=config, **options) as h:
            token = run(mode)
            records[mode] = h.wait_record(lambda r, token=token: match(r, token))
    assert {m: r["collector"]["transport"] for m, r in records.items()} == {m: m for m in MODES}
    return records["pipe"], records["socket"], records["forwarded"]


def _same(pipe: dict, sock: dict, crasher: Path, tmp_path: Path) -> None:
    """Same fields and identity; both cores open in gdb at the crash line."""
    assert pipe["status"] == sock["status"] == "complete", (pipe["collector"], sock["collector"])
    assert set(pipe) == set(sock) and set(pipe["process"]) == set(sock["process"])
    assert set(pipe["core"]) == set(sock["core"]) and set(pipe["container"]) == set(sock["container"])
    assert set(pipe["process"]["status"]) == set(sock["process"]["status"])
    for rec in (pipe, sock):
        assert rec["tid"] == rec["pid"]
        nspid = rec["process"]["status"]["NSpid"].split()
        assert nspid[0] == str(rec["pid"]) and nspid[-1] == str(rec["ns_pid"])
    same = ("schema", "uid", "gid", "signal", "comm", "exe", "cmdline", "cwd", "dump_mode", "core_limit")
    if pipe["container"]["runtime"] == "host":
        same += ("hostname",)  # a container's is its own (tested by the caller)
    assert {k: pipe[k] for k in same} == {k: sock[k] for k in same}
    ident = ("runtime", "source", "confidence", "errors")
    assert {k: pipe["container"][k] for k in ident} == {k: sock["container"][k] for k in ident}
    assert pipe["process"]["trusted"] is sock["process"]["trusted"] is True
    keep = ("file", "stored", "reason", "size", "truncated", "complete", "compression")
    assert {k: pipe["core"][k] for k in keep} == {k: sock["core"][k] for k in keep}
    assert pipe["collector"]["errors"] == sock["collector"]["errors"] == []
    for n, rec in enumerate((pipe, sock)):
        decompress(Path(rec["_dir"]) / rec["core"]["file"], tmp_path / f"core{n}")
        bt = gdb_backtrace(str(crasher), tmp_path / f"core{n}")
        assert " main " in bt and f"crasher.c:{CRASH_LINE}" in bt, bt


def _run(argv: list, core_limit: int = resource.RLIM_INFINITY) -> int:
    """Run ``argv`` to its end; its raw wait status (WCOREDUMP tells whether the kernel wrote a core)."""
    proc = subprocess.Popen(argv, preexec_fn=set_core_limit(core_limit), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return status


def test_host_crash_same_as_pipe(workdirs, crasher: Path, tmp_path: Path) -> None:
    def run(mode: str) -> None:
        status = _run([str(crasher), "0", "host"])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV and os.WCOREDUMP(status)
    pipe, sock, forwarded = _both(workdirs, run, lambda r, _: r["comm"] == "host")
    _same(pipe, sock, crasher, tmp_path)
    _same(pipe, forwarded, crasher, tmp_path)
    assert sock["container"]["runtime"] == "host" and sock["ns_pid"] == sock["pid"]


#: The transport fields: how the core came to corepipe, and what collecting it cost the process that collected it
#: (the pipe handler itself, or a server's worker: another process, with its own clock start, CPU and memory).
TRANSPORT = ("collector.transport", "collector.duration", "collector.cpu", "collector.peak_rss")
#: What differs between any two crashes of one program, whoever collects them: the crash's id, time and pids
#: (its /proc status counts its own pids and context switches, and in SigQ the signals queued to every process of
#: its uid on the host), and the core's bytes (its notes hold the pid and
#: times, so its digest and compressed size), and the backtrace's cost and one-off uid. gdb's text names the pid:
#: compared with the pid replaced.
PER_CRASH = ("id", "time", "timestamp", "received", "pid", "ns_pid", "tid", "core.digest", "core.compressed_size",
             "process.status.Pid", "process.status.Tgid", "process.status.NSpid", "process.status.NStgid",
             "process.status.NSpgid", "process.status.NSsid", "process.status.PPid",
             "process.status.voluntary_ctxt_switches", "process.status.nonvoluntary_ctxt_switches",
             "process.status.SigQ", "backtrace.duration", "backtrace.uid")


def _flat(value: object, prefix: str = "") -> dict:
    """A record as dotted paths to its leaves (lists stay leaves)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else key))
    return flat


def test_one_pipeline_identical_records(workdirs, crasher: Path) -> None:
    """The same program's crash through the pipe handler alone, the pipe handler forwarding to serve, and serve on
    the coredump socket: the records are identical, path for path and value for value, apart from TRANSPORT and
    what differs between any two crashes (PER_CRASH). ASLR is off for the crasher, so its maps are the same."""
    setarch = need_tool("setarch")

    def run(mode: str) -> None:
        status = _run([setarch, os.uname().machine, "-R", str(crasher), "0", "onepipe"])
        assert os.WIFSIGNALED(status) and os.WCOREDUMP(status)
    records = _both(workdirs, run, lambda r, _: r["comm"] == "onepipe")
    flat = [_flat({k: v for k, v in rec.items() if k != "_dir"}) for rec in records]
    for f in flat:
        f["backtrace.text"] = f["backtrace.text"].replace(str(f["pid"]), "<pid>")
    assert set(flat[0]) == set(flat[1]) == set(flat[2]), "the same fields"
    assert [f["collector.transport"] for f in flat] == ["pipe", "socket", "forwarded"]
    def ignored(path: str) -> bool:
        return any(path == p or path.startswith(f"{p}.") for p in TRANSPORT + PER_CRASH)
    for name in TRANSPORT + PER_CRASH:
        assert any(ignored(path) and path.startswith(name) for path in flat[0]), f"no {name} in the record"
    kept = [{k: v for k, v in f.items() if not ignored(k)} for f in flat]
    for mode, other in zip(("socket", "forwarded"), kept[1:]):
        differ = {k: (kept[0][k], other[k]) for k in kept[0] if kept[0][k] != other[k]}
        assert differ == {}, f"pipe and {mode} differ beyond the transport fields: {sorted(differ)} {differ}"
    assert kept[0]["status"] == "complete" and kept[0]["core.stored"] is True


def test_pid_namespace_same_as_pipe(workdirs, crasher: Path, tmp_path: Path) -> None:
    unshare = need_tool("unshare")

    def run(mode: str) -> str:
        _run([unshare, "--pid", "--fork", "--mount-proc", str(crasher)])
        return mode

    def match(rec: dict, mode: str) -> bool:
        # unshare re-raises its child's signal: two crashes; ours is PID 1 in its namespace.
        return rec["exe"] == str(crasher) and rec["ns_pid"] == 1
    pipe, sock, forwarded = _both(workdirs, run, match)
    _same(pipe, sock, crasher, tmp_path)
    _same(pipe, forwarded, crasher, tmp_path)
    assert sock["pid"] != 1 and sock["process"]["status"]["NSpid"].split() == [str(sock["pid"]), "1"]


@pytest.fixture(scope="module")
def podman_image(rootfs: Path) -> str:
    with image("podman", rootfs, "corepipe-12") as ref:
        yield ref


@pytest.mark.parametrize("tool", ["docker", "podman"])
def test_container_same_as_pipe(workdirs, request, tool: str, crasher: Path, tmp_path: Path) -> None:
    need_tool(tool)
    ref = request.getfixturevalue("docker_image" if tool == "docker" else "podman_image")
    names: list = []

    def run(mode: str) -> str:
        names.append(unique(f"corepipe-12-{mode}"))
        return run_crasher(tool, names[-1], ref)
    try:
        pipe, sock, forwarded = _both(workdirs, run, lambda r, cid: r["container"]["id"] == cid)
    finally:
        for name in names:
            subprocess.run([tool, "rm", "-f", name], capture_output=True)
    _same(pipe, sock, crasher, tmp_path)
    _same(pipe, forwarded, crasher, tmp_path)
    for rec in (pipe, sock, forwarded):
        assert rec["container"]["runtime"] == tool and rec["container"]["confidence"] == "certain"
        assert rec["container"]["name"].startswith("corepipe-12-") and rec["container"]["image"] == ref
        assert rec["ns_pid"] == 1 and rec["hostname"] == rec["container"]["id"][:12]
        assert Path(rec["_dir"]).parent.name == rec["container"]["id"]


def test_over_rate_limit_is_rejected(workdirs, crasher: Path) -> None:
    """The second crash of one executable within the window (limit 1): REJECT, the kernel writes no core."""
    with served_handler(workdirs(), config_extra="rate_limit_exe = 1\n") as served:
        first = _run([str(crasher), "0", "rate-1"])
        served.wait_record(lambda r: r["comm"] == "rate-1")
        second = _run([str(crasher), "0", "rate-2"])
        rec = served.wait_record(lambda r: r["comm"] == "rate-2")
    assert os.WCOREDUMP(first) and not os.WCOREDUMP(second)
    assert os.WIFSIGNALED(second) and os.WTERMSIG(second) == signal.SIGSEGV
    assert rec["status"] == "complete" and rec["core"]["stored"] is False and rec["core"]["file"] is None
    assert rec["core"]["reason"].startswith("rate limited: 1 cores of this executable"), rec["core"]
    assert rec["signal"] == {"number": signal.SIGSEGV, "name": "SIGSEGV"}, "the signal from the exit status"
    assert sorted(p.name for p in Path(rec["_dir"]).iterdir()) == ["record.json"]
    # The small record of any crash without a core (record.coreless), as the pipe handler writes it.
    assert (Path(rec["_dir"]) / "record.json").stat().st_size <= CORELESS_MAX
    assert rec["process"]["maps"] is None and not (rec.get("binaries") or {}).get("files"), rec.get("binaries")


def test_core_limit_zero_is_rejected(workdirs, crasher: Path) -> None:
    with served_handler(workdirs()) as served:
        status = _run([str(crasher), "0", "nocore"], core_limit=0)
        rec = served.wait_record(lambda r: r["comm"] == "nocore")
    assert not os.WCOREDUMP(status)
    assert rec["core_limit"] == 0 and rec["core"]["reason"] == "RLIMIT_CORE is 0"
    assert rec["core"]["stored"] is False and sorted(p.name for p in Path(rec["_dir"]).iterdir()) == ["record.json"]


def _no_core(rec: dict, reason: str) -> None:
    """A record without a core whose reason starts with ``reason``."""
    assert rec["status"] == "complete" and rec["core"]["stored"] is False and rec["core"]["file"] is None
    assert rec["core"]["reason"].startswith(reason), rec["core"]
    assert not list(Path(rec["_dir"]).glob("core*")), "no core file, not even a partial one"


def test_excluded_by_config(workdirs, crasher: Path) -> None:
    """exclude_executables: socket mode answers REJECT (the kernel writes no core), pipe mode reads and drops
    the core; both records say why, and another executable is still collected whole."""
    config = f'{NO_RATE_LIMIT}exclude_executables = ["*/{crasher.name}"]\n'
    reason = f"not stored: excluded by config (exclude_executables: '{crasher}' matches '*/{crasher.name}')"
    other = crasher.with_name("kept")
    other.write_bytes(crasher.read_bytes())
    other.chmod(0o755)
    statuses = {}
    for mode, handler in (("pipe", installed_handler), ("socket", served_handler)):
        with handler(workdirs(), config_extra=config) as h:
            statuses[mode] = _run([str(crasher), "0", f"excl-{mode}"])
            _no_core(h.wait_record(lambda r, mode=mode: r["comm"] == f"excl-{mode}"), reason)
            assert os.WCOREDUMP(_run([str(other), "0", f"kept-{mode}"]))
            assert h.wait_record(lambda r, mode=mode: r["comm"] == f"kept-{mode}")["core"]["stored"] is True
    assert os.WCOREDUMP(statuses["pipe"]), "a pipe handler cannot refuse the kernel's dump"
    assert not os.WCOREDUMP(statuses["socket"]) and os.WTERMSIG(statuses["socket"]) == signal.SIGSEGV


def test_container_image_excluded_is_rejected(workdirs, docker_image: str) -> None:
    """exclude_images, in socket mode: the container is identified before the ack, the record says why."""
    need_tool("docker")
    name = unique("corepipe-12-excl")
    with served_handler(workdirs(), config_extra=f'{NO_RATE_LIMIT}exclude_images = ["{docker_image}"]\n') as served:
        try:
            subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1", docker_image,
                            "/crasher"], capture_output=True, timeout=120)
            rec = served.wait_record(lambda r: r["container"]["name"] == name)
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    _no_core(rec, f"not stored: excluded by config (exclude_images: {docker_image!r} matches {docker_image!r})")
    assert rec["container"]["runtime"] == "docker" and rec["container"]["image"] == docker_image
    assert rec["signal"]["name"] == "SIGSEGV"


def test_over_quota_is_rejected(workdirs, crasher: Path) -> None:
    """max_use too small for any core, nothing to delete: REJECT before the dump, the record says why (records
    have a budget of their own, given here: the default, a tenth of max_use, would hold none)."""
    with served_handler(workdirs(), config_extra="max_use = 1000\nrecords_max_use = 1000000\n") as served:
        status = _run([str(crasher), "0", "quota"])
        rec = served.wait_record(lambda r: r["comm"] == "quota")
    assert not os.WCOREDUMP(status) and os.WTERMSIG(status) == signal.SIGSEGV
    _no_core(rec, "no room for the core: max_use (1000 bytes) leaves ")
    assert rec["signal"] == {"number": signal.SIGSEGV, "name": "SIGSEGV"}


def test_not_dumping_peer_is_ignored(workdirs) -> None:
    """A local process that connects to the socket is not the kernel: no record, the server goes on."""
    with served_handler(workdirs()) as served:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(served.socket))
            sock.sendall(b"\x10\0\0\0\x10\0\0\0\x0f" + b"\0" * 7)
            sock.settimeout(30)
            try:
                answer = sock.recv(16)
            except ConnectionResetError:  # closed with our request unread
                answer = b""
            assert answer == b"", "the server closes a peer that is not dumping core, with no ack"
        wait_log(f"pid {os.getpid()} connected to the coredump socket but is not dumping core")
        assert served.proc.poll() is None
        assert not served.store.exists() or served.records() == []


def _children(pid: int) -> set:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_server_killed_mid_dump(workdirs, crasher: Path) -> None:
    """SIGKILL the server and the worker streaming a big core: the record is left 'collecting' with no core
    under its final name, and the guardian's fallback (the pipe handler) collects the next crash."""
    with served_handler(workdirs()) as served:
        health = json.loads((served.run_dir / "serve.json").read_text())
        big = subprocess.Popen([str(crasher), "512", "big"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        rec = wait_for(lambda: next((r for r in served.records() if r["comm"] == "big"), None), 60,
                       "the big crash's first record")
        assert rec["status"] == "collecting"
        workers = _children(served.proc.pid) - {health["guardian"], health["metrics"]}
        assert workers, "a worker is streaming the core"
        os.kill(served.proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        served.proc.wait(30)
        wait_for(lambda: CORE_PATTERN.read_text().rstrip("\n") == served.pattern(), 30, "the fallback pattern")
        big.wait(120)
        [left] = [r for r in served.records() if r["comm"] == "big"]
        assert left["status"] == "collecting" and left["core"]["stored"] is False
        assert not (Path(left["_dir"]) / "core.zst").exists()
        after = _run([str(crasher), "0", "after-kill"])
        assert os.WCOREDUMP(after)
        rec = served.wait_record(lambda r: r["comm"] == "after-kill")
        assert rec["status"] == "complete" and rec["core"]["stored"] is True


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_process_group_killed(workdirs, crasher: Path) -> None:
    """SIGKILL of serve's whole process group (an OOM kill of the group): its guardian, in a session of its own,
    puts the fallback back. With the guardian killed too, the socket pattern is left without a listener: status
    says broken and names the fallback the server noted; a restarted server without --fallback takes that note,
    and its clean stop leaves the fallback."""
    setsid = need_tool("setsid")
    d = workdirs()
    served = Served(d)
    paths = install.Paths(bin=f"{d}/b", config=f"{d}/none.toml", sysctl_dir=f"{d}/sd")
    with KernelSettings() as settings:
        fallback = served.pattern()
        settings.set(fallback)
        try:
            served.start(prefix=(setsid,))  # a group of its own: ours must survive the kill
            guardian = served.health()["guardian"]
            assert os.getpgid(served.proc.pid) == served.proc.pid and os.getpgid(guardian) != served.proc.pid
            os.killpg(served.proc.pid, signal.SIGKILL)
            served.proc.wait(30)
            wait_for(lambda: CORE_PATTERN.read_text().rstrip("\n") == fallback, 30, "the guardian's fallback")
            assert status.gather(paths, run_dir=str(served.run_dir))["listener"] is None

            served.start(prefix=(setsid,))
            owned = CORE_PATTERN.read_text().rstrip("\n")
            assert owned.startswith("@") and status.gather(paths, run_dir=str(served.run_dir))["listener"] is True
            # the killed server's health file stays until this one writes its own: its guardian is not ours
            wait_for(lambda: served.health().get("pid") == served.proc.pid, 30, "the new server's health file")
            guardian = served.health()["guardian"]
            # As a pod's force-delete kills every process at once: both stopped first, so that neither sees the
            # other die (the server would start a new guardian, a guardian would put the fallback back).
            os.killpg(served.proc.pid, signal.SIGSTOP)
            os.kill(guardian, signal.SIGSTOP)
            os.kill(guardian, signal.SIGKILL)
            wait_for(lambda: _gone(guardian), 30, "the guardian's end")
            os.killpg(served.proc.pid, signal.SIGKILL)
            served.proc.wait(30)
            assert CORE_PATTERN.read_text().rstrip("\n") == owned, "nobody put the fallback back"
            # the server is reaped, but its workers (same group, the listening socket inherited) may still be exiting
            wait_for(lambda: status.gather(paths, run_dir=str(served.run_dir))["listener"] is False, 30,
                     "the listening socket's last holder to exit")
            facts = status.gather(paths, run_dir=str(served.run_dir))
            assert facts["code"] == status.BROKEN and facts["listener"] is False
            assert [p for p in facts["problems"] if "no listener" in p and fallback in p], facts["problems"]
            shown = subprocess.run([sys.executable, "-m", "corepipe", "status", "--config", paths.config],
                                   capture_output=True, text=True, timeout=60)
            assert shown.returncode in (status.BROKEN, status.NOT_INSTALLED) and "no listener" in shown.stdout

            restarted = subprocess.Popen([str(served.launcher), "serve", "--config", str(served.config), "--socket",
                                          str(served.socket), "--run-dir", str(served.run_dir)], env={}, cwd="/",
                                         stdout=subprocess.DEVNULL, stderr=(d / "serve.err").open("a"))
            served.proc = restarted
            wait_for(lambda: restarted.poll() is not None or (served.run_dir / "serve.json").exists()
                     and served.health()["pid"] == restarted.pid, 30, "the restarted server")
            assert restarted.poll() is None, (d / "serve.err").read_text()
            assert served.health()["fallback"] == fallback, "the fallback from the dead server's note"
            assert os.WCOREDUMP(_run([str(crasher), "0", "restarted"]))
            served.wait_record(lambda r: r["comm"] == "restarted")
            assert served.stop() == 0
            assert CORE_PATTERN.read_text().rstrip("\n") == fallback, "the clean stop put the fallback back"
            assert not (served.run_dir / "pattern.json").exists()
            assert status.gather(paths, run_dir=str(served.run_dir))["listener"] is None
        finally:
            served.stop()


def _with_children(pid: int) -> list:
    """``pid`` and its children (the server and the workers it forks)."""
    try:
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    except OSError:
        return [pid]


def test_server_killed_mid_storm_leaves_a_record_of_every_crash(workdirs, crasher: Path) -> None:
    """Socket mode saturated (one core at a time; the other crashes wait in the server's queue, the kernel
    holding them), then the server and its workers SIGKILLed: every crash has a record, complete or left
    'collecting' with no core under its final name, and the crashes after the kill are collected."""
    config = NO_RATE_LIMIT + "concurrent_cores = 1\ncore_wait = 120\n"
    names = [f"storm{i}" for i in range(8)]
    with served_handler(workdirs(), config_extra=config) as served:
        _run([str(crasher), "0", "warmup"])  # makes the store and its slot files
        served.wait_record(lambda r: r["comm"] == "warmup")
        with holding_slots(served.store, slots.CORE, 1):  # every worker waits for the core slot, the rest queue
            storm = [subprocess.Popen([str(crasher), "16", name], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
                     for name in names]
            wait_for(lambda: served.health()["queued"] >= 3, 120, "a saturated server")
            health = served.health()
            workers = _children(served.proc.pid) - {health["guardian"], health["metrics"]}
            os.kill(served.proc.pid, signal.SIGKILL)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
        served.proc.wait(30)
        wait_for(lambda: CORE_PATTERN.read_text().rstrip("\n") == served.pattern(), 30, "the fallback pattern")
        for proc in storm:
            proc.wait(120)

        def every_crash() -> dict:
            got = {r["comm"]: r for r in served.records() if r["comm"] in names}
            return got if set(got) == set(names) else {}
        records = wait_for(every_crash, 60, "a record of every crash")
        for name, rec in records.items():
            core = Path(rec["_dir"]) / "core.zst"
            assert rec["status"] in ("complete", "collecting"), (name, rec["status"], rec["collector"])
            if rec["status"] == "collecting" or not rec["core"]["stored"]:
                assert not core.exists(), (name, rec["core"])
            else:
                assert core.stat().st_size == rec["core"]["compressed_size"], (name, rec["core"])
        recovered = [rec for rec in records.values() if "before a worker took the crash" in
                     (rec["core"].get("reason") or "")]
        assert recovered, "no crash was still queued when the server died: the test proves nothing"
        assert all(rec["uid"] == os.getuid() and rec["pid"] in {p.pid for p in storm} for rec in recovered)
        after = _run([str(crasher), "0", "after-storm"])
        assert os.WCOREDUMP(after)
        rec = served.wait_record(lambda r: r["comm"] == "after-storm")
        assert rec["status"] == "complete" and rec["core"]["stored"] is True


def _threads_cpus(pids: list) -> set:
    """The ``Cpus_allowed_list`` of every thread of ``pids``."""
    found = set()
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        found |= {cpus_allowed(task / "status") for task in tasks}
    return found


@pytest.mark.parametrize("mode", ["pipe", "socket"])
def test_the_dumping_task_shares_one_cpu_with_the_reader(workdirs, crasher: Path, mode: str) -> None:
    """While a core streams, Placement (affinity.py) probes the two ends apart and together in turns: the crashed
    task is seen on one CPU, which a thread of the reader is on too, and never on one the reader is not on; the
    core is whole. One zstd worker at level 19 takes the core's random quarter at about 2 MB/s, so each 8 MiB
    probe (after the first 4 MiB compressed) lasts seconds and 20 ms polling cannot miss one (at the default
    level it is a few milliseconds)."""
    need(len(os.sched_getaffinity(0)) >= 2, "needs 2 CPUs: one is shared, zstd's workers use the others")
    handler = served_handler if mode == "socket" else installed_handler
    config = NO_RATE_LIMIT + "compression_level = 19\ncompression_threads = 1\n"
    with handler(workdirs(), config_extra=config) as h:
        readers = (lambda: _with_children(h.proc.pid)) if mode == "socket" else h.pids
        big = subprocess.Popen([str(crasher), "96", "onecpu"], preexec_fn=set_core_limit(resource.RLIM_INFINITY))
        together, alone = set(), 0  # the CPUs the task shared with the reader; samples on a CPU of its own
        try:
            deadline = time.monotonic() + 300
            while big.poll() is None and time.monotonic() < deadline:
                before = _threads_cpus(readers())
                task = cpus_allowed(Path(f"/proc/{big.pid}/status")) or ""
                after = _threads_cpus(readers())  # a join or a part may fall between the reads: either side counts
                if task.isdigit():
                    if task in before | after:
                        together.add(task)
                    else:
                        alone += 1  # between the two calls of a join or a part: once at most
                time.sleep(0.02)
        finally:
            returncode = big.wait(120)
        assert returncode == -signal.SIGSEGV
        rec = h.wait_record(lambda r: r["comm"] == "onecpu")
        assert rec["status"] == "complete" and rec["core"]["stored"] and rec["core"]["complete"]
        assert together and alone <= 1, (together, alone)
        assert {int(cpu) for cpu in together} <= os.sched_getaffinity(0)


def test_stop_puts_the_pipe_pattern_back(workdirs, crasher: Path) -> None:
    with served_handler(workdirs()) as served:
        assert CORE_PATTERN.read_text().rstrip("\n") == f"@@{served.socket}"
        assert served.stop() == 0
        assert CORE_PATTERN.read_text().rstrip("\n") == served.pattern()
        assert not served.socket.exists() and not (served.run_dir / "serve.json").exists()
        _run([str(crasher), "0", "after-stop"])
        assert served.wait_record(lambda r: r["comm"] == "after-stop")["core"]["stored"] is True


def _collects(served: Served, crasher: Path, comm: str) -> None:
    """The kernel points at the server's socket, and a crash there is stored whole."""
    assert CORE_PATTERN.read_text().rstrip("\n") == f"@@{served.socket}"
    assert os.WCOREDUMP(_run([str(crasher), "0", comm]))
    rec = served.wait_record(lambda r: r["comm"] == comm)
    assert rec["status"] == "complete" and rec["core"]["stored"] is True


def test_systemd_units_are_hardened() -> None:
    units = Path(__file__).resolve().parents[2] / "install" / "systemd"
    sock, service = (units / "corepipe.socket").read_text(), (units / "corepipe.service").read_text()
    assert "ListenStream=/run/corepipe/coredump.socket\n" in sock and "SocketMode=0600\n" in sock
    assert "ExecStart=/usr/local/bin/corepipe serve\n" in service and "Wants=corepipe-forward.socket\n" in service
    for line in ("ProtectSystem=strict", "ReadWritePaths=/var/lib/corepipe /run/corepipe", "IPAddressDeny=any",
                 "IPAddressAllow=localhost", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "NoNewPrivileges=yes",
                 "Restart=always", "KillMode=mixed"):
        assert f"\n{line}\n" in service, line
    # systemd-analyze verify of every unit: tests/unit/test_systemd_units.py


def test_backtrace_sandbox_within_the_units_capabilities(workdirs, crasher: Path) -> None:
    """The server under corepipe.service's CapabilityBoundingSet and NoNewPrivileges (applied with setpriv):
    the backtrace still runs in its sandbox (mount namespace, chroot, a one-off uid it can kill)."""
    setpriv = need_tool("setpriv")
    need_root_kernel()
    service = (Path(__file__).resolve().parents[2] / "install" / "systemd" / "corepipe.service").read_text()
    caps = [cap.lower().removeprefix("cap_") for line in service.splitlines()
            if line.startswith("CapabilityBoundingSet=") for cap in line.split("=", 1)[1].split()]
    served = Served(workdirs())
    with KernelSettings() as settings:
        settings.set(served.pattern())
        try:
            served.start(prefix=(setpriv, "--no-new-privs", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in
                                                                                                  caps)])))
            assert os.WCOREDUMP(_run([str(crasher), "0", "unitcaps"]))
            rec = served.wait_record(lambda r: r["comm"] == "unitcaps")
        finally:
            assert served.stop() == 0
    backtrace = rec["backtrace"]
    assert backtrace["error"] is None and f"crasher.c:{CRASH_LINE}" in backtrace["text"], backtrace
    assert sandbox.UID_RANGE[0] <= backtrace["uid"] <= sandbox.UID_RANGE[1], backtrace


def test_socket_activation(workdirs, crasher: Path) -> None:
    """Started the way systemd starts it (LISTEN_FDS): it serves the socket it was given, and writes the pattern."""
    activate = need_tool("systemd-socket-activate")
    need_root_kernel()
    served = Served(workdirs())
    with KernelSettings() as settings:
        settings.set(served.pattern())
        served.proc = subprocess.Popen([activate, "-l", str(served.socket), str(served.launcher), "serve", "--config",
                                        str(served.config), "--socket", "/nonexistent/ignored.sock", "--run-dir",
                                        str(served.run_dir), "--fallback", served.pattern()],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(served.socket.exists, 30, "the activator's socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as nudge:  # it starts the server on a connection
                nudge.connect(str(served.socket))
                wait_for(lambda: (served.run_dir / "serve.json").exists(), 30, "the server's health file")
            health = json.loads((served.run_dir / "serve.json").read_text())
            assert health["activated"] is True and health["socket"] == str(served.socket)
            _collects(served, crasher, "activated")
        finally:
            assert served.stop() == 0
        assert CORE_PATTERN.read_text().rstrip("\n") == served.pattern()


def test_server_in_its_own_mount_namespace(workdirs, crasher: Path) -> None:
    """As in a pod (or systemd's sandbox): the kernel takes a socket pattern only from the host's mount
    namespace, so the server writes it (and the fallback on stop) from there."""
    unshare = need_tool("unshare")
    need_root_kernel()
    served = Served(workdirs())
    with KernelSettings() as settings:
        settings.set(served.pattern())
        try:
            # This test is the host process whose mounts the server joins (PID 1 may not be ours to join).
            served.start("--host-pid", str(os.getpid()), prefix=(unshare, "--mount", "--propagation", "private"))
            assert os.readlink(f"/proc/{served.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            _collects(served, crasher, "own-mounts")
        finally:
            assert served.stop() == 0
        assert CORE_PATTERN.read_text().rstrip("\n") == served.pattern()


def test_install_socket_mode_then_serve_then_uninstall(workdirs, crasher: Path) -> None:
    """install --mode socket writes the pipe handler; the server (its fallback taken from the install state)
    switches the kernel to its socket, status follows, and uninstall restores the pattern found before."""
    need_root_kernel()
    d = workdirs()
    sock, run_dir = d / "s.sock", d / "run"
    paths = install.Paths(bin=f"{d}/b", config=f"{d}/c.toml", sysctl_dir=f"{d}/sd")
    with KernelSettings() as settings:
        # --force: whatever handler this machine has now, the test's KernelSettings puts it back.
        cli = [sys.executable, "-m", "corepipe"]
        done = subprocess.run([*cli, "install", "--config", paths.config, "--bin", paths.bin, "--sysctl-dir",
                               paths.sysctl_dir, "--store", f"{d}/store", "--mode", "socket", "--socket", str(sock),
                               "--force"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        pipe = CORE_PATTERN.read_text().rstrip("\n")
        # the static forwarder beside the launcher where it builds, the launcher itself where it does not
        assert pipe.startswith((f"|{d}/corepipe-forward collect ", f"|{paths.bin} collect ")), pipe
        facts = status.gather(paths, run_dir=str(run_dir))
        assert (facts["mode"], facts["active_mode"], facts["code"]) == ("socket", "pipe", status.HEALTHY)
        server = subprocess.Popen([paths.bin, "serve", "--config", paths.config, "--socket", str(sock),
                                   "--run-dir", str(run_dir)], env={}, cwd="/", stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (run_dir / "serve.json").exists() and CORE_PATTERN.read_text().startswith("@@"), 30,
                     "the server")
            facts = status.gather(paths, run_dir=str(run_dir))
            assert (facts["active_mode"], facts["code"]) == ("socket", status.HEALTHY), facts["problems"]
            assert facts["server"]["alive"] and facts["server"]["fallback"] == pipe
            assert os.WCOREDUMP(_run([str(crasher), "0", "installed"]))
            wait_for(lambda: [p for p in (d / "store").rglob("record.json") if '"installed"' in p.read_text()
                              and '"complete"' in p.read_text()], 30, "the record")
        finally:
            server.terminate()
            assert server.wait(60) == 0
        assert CORE_PATTERN.read_text().rstrip("\n") == pipe, "the server gave the kernel back the pipe handler"
        done = subprocess.run([*cli, "uninstall", "--config", paths.config], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert CORE_PATTERN.read_bytes() == settings.start_pattern


def test_status_says_a_killed_server_is_not_running(workdirs) -> None:
    """serve (as installed, pipe mode) SIGKILLed leaves its serve.json: status says the server is not running,
    and what to do, while the killed process is a zombie, once it is reaped, and once its pid is a later process
    whose command line says corepipe serve (the pid recycled): the file's start time is not that process's."""
    need_root_kernel()
    d = workdirs()
    run_dir = d / "run"
    paths = install.Paths(bin=f"{d}/b", config=f"{d}/c.toml", sysctl_dir=f"{d}/sd")
    cli = [sys.executable, "-m", "corepipe"]

    def server_line() -> str:
        shown = subprocess.run([*cli, "status", "--config", paths.config], capture_output=True, text=True, timeout=60)
        assert shown.returncode == status.HEALTHY, shown.stdout + shown.stderr
        [line] = [line for line in shown.stdout.splitlines() if line.startswith("server: ")]
        return line

    with KernelSettings():
        done = subprocess.run([*cli, "install", "--config", paths.config, "--bin", paths.bin, "--sysctl-dir",
                               paths.sysctl_dir, "--store", f"{d}/store", "--mode", "pipe", "--run-dir", str(run_dir),
                               "--force"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        with open(paths.config, "a") as f:
            f.write('metrics_listen = "127.0.0.1:0"\n')
        server = subprocess.Popen([paths.bin, "serve", "--config", paths.config, "--run-dir", str(run_dir)],
                                  env={}, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        impostor = None
        try:
            wait_for(lambda: (run_dir / "serve.json").exists(), 30, "the server's health file")
            assert f"corepipe serve pid {server.pid} healthy, pipe mode" in server_line()
            for pid in reversed(_with_children(server.pid)):
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: _gone(server.pid), 30, "the server's end")
            dead = (f"server: not running (serve.json names pid {server.pid}, a corepipe serve that died without "
                    "removing it); start it")
            assert (run_dir / "serve.json").exists() and server_line().startswith(dead)
            server.wait(30)
            assert server_line().startswith(dead)
            impostor = recycle_pid(server.pid, [f"{paths.bin} serve --config {paths.config}", "60"])
            wait_for(lambda: b" serve " in Path(f"/proc/{impostor.pid}/cmdline").read_bytes(), 30, "the exec")
            assert server_line().startswith(dead)
        finally:
            for proc in (server, impostor):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            subprocess.run([*cli, "uninstall", "--config", paths.config], capture_output=True, timeout=120)
