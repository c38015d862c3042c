"""Signatures of real crashes (through the real kernel, gdb and Docker), grouping in ``list``, the per-signature
core policy.

One module fixture crashes everything under one hold of the tests' kernel lock: tests/crasher.c on the host
and in two containers of one image, and tests/bugs.c (one executable, several bugs and callers), a stripped
copy of it and a copy named ``looper`` crashed in a loop.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from runtimes import unique
from support import (
    NO_RATE_LIMIT,
    corepipe_cli,
    crash,
    installed_handler,
    need_tool,
    short_tempdir,
    start_crash,
    wait_for,
)

#: The loop's crashes, of which the policy keeps the first LOOP_CORES cores (as many as bugs.c's crashes at
#: write_site that must have a core: they share one crash site).
LOOP, LOOP_CORES = 6, 4
MODES = ("near-a", "near-b", "deep-a", "deep-b", "other", "abort", "handler")


def _docker_crash(image: str) -> str:
    name = unique("corepipe-16")
    try:
        run = subprocess.run(["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1", image,
                              "/crasher"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 128 + signal.SIGSEGV, run.stderr
        return subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                              check=True).stdout.strip()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.fixture(scope="module")
def crashed(bugs: dict, crasher: Path, docker_image: str) -> dict:
    need_tool("gdb")
    programs = bugs
    workdir = short_tempdir()
    workdir.chmod(0o755)
    config = NO_RATE_LIMIT + f"signature_max_cores = {LOOP_CORES}\n"
    try:
        with installed_handler(workdir, config_extra=config) as handler:
            crash([str(crasher), "0", "sig-host"])
            containers = [_docker_crash(docker_image) for _ in range(2)]
            for mode in MODES:
                crash([str(programs["bugs"]), mode, mode])
            crash([str(programs["bugs"]), "near-a", "nocore"], core_limit=0)
            for mode in ("near-a", "near-a", "other"):
                crash([str(programs["stripped"]), mode, "s-" + mode])
            loop_pids = []  # in crash order
            for _ in range(LOOP):
                proc = start_crash([str(programs["looper"]), "near-a", "loop"])
                proc.wait(timeout=120)
                loop_pids.append(proc.pid)
                # A small core lets the process go before its collector is admitted: the next crash waits for this
                # one's record, so that the admissions come in crash order.
                handler.wait_record(lambda r, pid=proc.pid: r["pid"] == pid and r["comm"] == "loop", 60)
            crash([str(programs["looper"]), "other", "newbug"])
            found = {"host": handler.wait_record(lambda r: r["comm"] == "sig-host"),
                     "containers": [handler.wait_record(lambda r, c=c: r["container"]["id"] == c) for c in containers]}
            for mode in MODES:
                found[mode] = handler.wait_record(lambda r, m=mode: r["comm"] == m)
            for comm, count in (("nocore", 1), ("s-near-a", 2), ("s-other", 1), ("loop", LOOP), ("newbug", 1)):
                wait_for(lambda c=comm, n=count: len([r for r in handler.records() if r["comm"] == c
                                                      and r["status"] != "collecting"]) == n, 60, f"{count} {comm}")
        found["records"] = handler.records()
        found["loop_pids"] = loop_pids
        found["store"] = handler
        yield found
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _by_comm(found: dict, comm: str) -> list:
    return [r for r in found["records"] if r["comm"] == comm]


def test_same_bug_on_the_host_and_in_two_containers_is_one_signature(crashed: dict, docker_image: str) -> None:
    recs = [crashed["host"], *crashed["containers"]]
    assert [r["container"]["runtime"] for r in recs] == ["host", "docker", "docker"]
    assert {r["container"]["image"] for r in recs[1:]} == {docker_image}
    sigs = [r["signature"] for r in recs]
    assert all(s["source"] == "backtrace" and s["version"] == 1 and s["fallback_reason"] is None for s in sigs), sigs
    assert {s["hash"] for s in sigs} == {sigs[0]["hash"]} and re.fullmatch(r"[0-9a-f]{16}", sigs[0]["hash"])
    assert sigs[0]["text"] == "crasher SIGSEGV: main"


def test_sites_and_callers(crashed: dict) -> None:
    sig = {mode: crashed[mode]["signature"] for mode in MODES}
    assert all(s["source"] == "backtrace" for s in sig.values()), sig
    assert sig["near-a"]["text"] == "bugs SIGSEGV: write_site | caller_a | main"
    assert sig["near-b"]["text"] == "bugs SIGSEGV: write_site | caller_b | main"  # the caller is a counted frame
    # Reached through different callers below the top three frames: the same signature.
    assert sig["deep-a"]["text"] == sig["deep-b"]["text"] == "bugs SIGSEGV: write_site | middle_2 | middle_1"
    assert sig["deep-a"]["hash"] == sig["deep-b"]["hash"] != sig["near-a"]["hash"] != sig["near-b"]["hash"]
    # Another crash site in the same executable.
    assert sig["other"]["text"] == "bugs SIGSEGV: read_site | main"
    # The crash site (known before the core is read) is that of the faulting instruction: shared by every
    # caller of write_site, not by read_site.
    assert len({sig[m]["site"] for m in ("near-a", "near-b", "deep-a", "deep-b")}) == 1
    assert sig["other"]["site"] != sig["near-a"]["site"]


def test_abort_through_raise_folds_to_its_caller(crashed: dict) -> None:
    rec = crashed["abort"]
    assert rec["signal"]["name"] == "SIGABRT"
    names = [f["function"] for f in rec["backtrace"]["frames"]]
    assert "raise" in names and "abort" in names, names  # libc's frames were there
    assert rec["signature"]["text"] == "bugs SIGABRT: abort_site | main"


def test_a_signal_handlers_frames_are_skipped(crashed: dict) -> None:
    rec = crashed["handler"]
    frames = rec["backtrace"]["frames"]
    assert rec["signal"]["name"] == "SIGABRT" and any(f["sigtramp"] for f in frames), frames
    assert "on_segv" in [f["function"] for f in frames]
    assert rec["signature"]["text"] == "bugs SIGABRT: read_site | main"


def test_stripped_binary_gets_a_stable_build_id_offset_signature(crashed: dict) -> None:
    recs = _by_comm(crashed, "s-near-a")
    other = _by_comm(crashed, "s-other")[0]
    build_id = next(f["build_id"] for f in recs[0]["binaries"]["files"] if f["exe"])
    assert re.fullmatch(r"[0-9a-f]{40}", build_id)
    sigs = [r["signature"] for r in recs]
    assert sigs[0]["hash"] == sigs[1]["hash"] != other["signature"]["hash"]
    pattern = rf"bugs-stripped@{build_id[:16]}\+0x[0-9a-f]+"
    assert len(sigs[0]["frames"]) == 3 and all(re.fullmatch(pattern, f) for f in sigs[0]["frames"]), sigs[0]
    # The same code: the offsets are those of the unstripped build's functions (one file, two names).
    unstripped = subprocess.run(["nm", str(Path(crashed["near-a"]["exe"]))], capture_output=True, text=True).stdout
    assert " write_site" in unstripped


def test_without_a_backtrace_the_crash_site_stands_in(crashed: dict) -> None:
    rec = _by_comm(crashed, "nocore")[0]
    sig = rec["signature"]
    assert rec["core"]["stored"] is False and "backtrace" not in rec
    assert sig["source"] == "crash site" and sig["fallback_reason"] == "no backtrace: no core stored (RLIMIT_CORE is 0)"
    # A record without a core is small (record.coreless): no binaries.files, no maps. The executable itself
    # gives its build id and where write_site lies in the file.
    notes = subprocess.run(["readelf", "-n", rec["exe"]], capture_output=True, text=True, check=True).stdout
    build_id = re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)
    assert rec["binaries"].get("files", []) == [] and not rec["process"].get("maps")
    match = re.fullmatch(rf"bugs@{build_id[:16]} SIGSEGV: at bugs@{build_id[:16]}\+(0x[0-9a-f]+)", sig["text"])
    assert match, sig
    # The faulting instruction (from the core's NT_PRSTATUS note, placed with the maps captured at the crash)
    # is inside write_site: its file offset, through the segment that loads it, against the symbol table.
    symbols = subprocess.run(["nm", "-S", rec["exe"]], capture_output=True, text=True, check=True).stdout
    address, size = next((int(a, 16), int(n, 16)) for a, n, _t, name in (line.split() for line in
                         symbols.splitlines() if len(line.split()) == 4) if name == "write_site")
    headers = subprocess.run(["readelf", "-lW", rec["exe"]], capture_output=True, text=True, check=True).stdout
    offset = next(int(f[1], 16) + address - int(f[2], 16) for f in (line.split() for line in headers.splitlines())
                  if f and f[0] == "LOAD" and int(f[2], 16) <= address < int(f[2], 16) + int(f[5], 16))
    assert offset <= int(match.group(1), 16) < offset + size
    # Its crash site is that of the backtraced crashes of write_site; they have four signatures between them,
    # so it joins none of their groups.
    assert sig["site"] == crashed["near-a"]["signature"]["site"]
    from corepipe.domain.signature import keys

    assert keys([crashed["near-a"], crashed["near-b"], rec]) == [crashed["near-a"]["signature"]["hash"],
                                                               crashed["near-b"]["signature"]["hash"], sig["hash"]]


def test_crash_loop_keeps_the_first_cores_of_its_signature(crashed: dict) -> None:
    loop = sorted(_by_comm(crashed, "loop"), key=lambda r: crashed["loop_pids"].index(r["pid"]))  # crash order
    assert len(loop) == LOOP
    assert [r["core"]["stored"] for r in loop] == [True] * LOOP_CORES + [False] * (LOOP - LOOP_CORES)
    for rec in loop:
        if not rec["core"]["stored"]:
            assert rec["core"]["reason"].startswith(f"rate limited: {LOOP_CORES} cores of this signature"), rec["core"]
            assert rec["signature"]["source"] == "crash site"
            assert rec["signature"]["fallback_reason"].startswith("no backtrace: no core stored (rate limited")
    assert {r["signature"]["site"] for r in loop} == {loop[0]["signature"]["site"]}
    # The new bug in the same executable was not held back by the loop.
    assert _by_comm(crashed, "newbug")[0]["core"]["stored"] is True


def test_list_group_shows_the_loop_and_the_new_bug(crashed: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    for rec in _by_comm(crashed, "loop") + _by_comm(crashed, "newbug"):
        shutil.copytree(rec["_dir"], store / "host" / Path(rec["_dir"]).name)
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{store}"\n')
    groups = json.loads(corepipe_cli(config, "list", "--group", "--json").stdout)
    loop_sig = next(r for r in _by_comm(crashed, "loop") if r["core"]["stored"])["signature"]
    new_sig = _by_comm(crashed, "newbug")[0]["signature"]
    assert [(g["signature"], g["count"], g["cores"]) for g in groups] == [
        (loop_sig["text"], LOOP, LOOP_CORES), (new_sig["text"], 1, 1)]
    assert groups[0]["hash"] == loop_sig["hash"] and groups[0]["containers"] == ["host"]
    assert groups[0]["sample"] in {r["id"] for r in _by_comm(crashed, "loop")}
    assert groups[0]["first_seen"] <= groups[0]["last_seen"]
    table = corepipe_cli(config, "list", "--group").stdout.splitlines()
    assert table[0].split("\t")[:2] == ["HASH", "COUNT"] and len(table) == 3
    assert table[1].split("\t")[:3] == [loop_sig["hash"], str(LOOP), str(LOOP_CORES)]

    listed = json.loads(corepipe_cli(config, "list", "--json", "--signature", loop_sig["hash"][:8]).stdout)
    assert len(listed) == LOOP  # the rate-limited crashes too, by their crash site
    assert len(json.loads(corepipe_cli(config, "list", "--json", "--signature", new_sig["text"]).stdout)) == 1

    info = corepipe_cli(config, "info", _by_comm(crashed, "newbug")[0]["id"]).stdout
    assert f"signature:           {new_sig['text']}" in info and "crashes with it: 1" in info, info
    some_loop = _by_comm(crashed, "loop")[-1]["id"]
    assert f"crashes with it: {LOOP}" in corepipe_cli(config, "info", some_loop).stdout


def test_list_filters_by_image_and_signature(crashed: dict, docker_image: str) -> None:
    handler = crashed["store"]
    groups = json.loads(corepipe_cli(handler.config, "list", "--group", "--json", "--image", docker_image).stdout)
    assert [(g["count"], g["hash"], g["images"]) for g in groups] == [
        (2, crashed["host"]["signature"]["hash"], [docker_image])]
    every = json.loads(corepipe_cli(handler.config, "list", "--group", "--json",
                                 "--signature", crashed["host"]["signature"]["hash"]).stdout)
    assert every[0]["count"] == 3 and "host" in every[0]["containers"] and len(every[0]["containers"]) == 3
    none = corepipe_cli(handler.config, "list", "--json", "--since", "1d", "--signature", "0" * 16).stdout
    assert json.loads(none) == []
