"""Azure Batch tasks through the real kernel: the record's ``batch`` names pool, job, task and node, confirmed
from Docker's state for a container started the way the Batch agent starts one (the variables with ``-e``,
``--ulimit core=-1``, no mount), unconfirmed from the environment of a host task; a process that rewrites its
own environment cannot change what a container's record says; ``list --remote --job`` answers for a pool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import objectstores
import pytest
from runtimes import image, make_rootfs, unique
from support import Handler, corepipe_cli, crash, installed_handler, served_handler, short_tempdir

AGENT = {"AZ_BATCH_POOL_ID": "pool-1", "AZ_BATCH_JOB_ID": "nightly-7", "AZ_BATCH_TASK_ID": "42",
         "AZ_BATCH_NODE_ID": "tvm-3", "AZ_BATCH_NODE_ROOT_DIR": "/mnt/batch/tasks"}
NAMED = {"pool": "pool-1", "job": "nightly-7", "task": "42", "node": "tvm-3"}
#: Room the forger overwrites with AZ_BATCH_JOB_ID=injected (tests/forger.c).
PAD = {"PAD": "p" * 40}


@pytest.fixture(scope="module")
def task_image(tmp_path_factory: pytest.TempPathFactory, crasher: Path, forger: Path) -> Iterator[str]:
    """busybox, /crasher and /forger."""
    root = make_rootfs(tmp_path_factory.mktemp("batch-rootfs"), crasher)
    shutil.copy2(forger, root / "forger")
    with image("docker", root, "corepipe-batch") as ref:
        yield ref


def run_task(handler: Handler, task_image: str, program: str, env: dict) -> dict:
    """A container task as the Batch agent starts one: its variables with -e, --ulimit core=-1, no bind mount;
    the record of its crash."""
    name = unique("corepipe-batch")
    argv = ["docker", "run", "--name", name, "--network=none", "--ulimit", "core=-1"]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    run = subprocess.run([*argv, task_image, program], capture_output=True, text=True, timeout=120)
    try:
        assert run.returncode == 139, run.stderr
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                             check=True).stdout.strip()
        rec = handler.wait_record(lambda r: r["container"]["id"] == cid)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert rec["container"]["confidence"] == "certain" and rec["container"]["name"] == name
    return rec


def host_env(extra: dict) -> dict:
    """This process's environment without any Batch variables of its own, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AZ_BATCH_")}, **extra}


def test_container_task_is_named_from_dockers_state(kernel_handler: Handler, task_image: str) -> None:
    rec = run_task(kernel_handler, task_image, "/crasher", AGENT)
    assert rec["schema"] == 2
    assert rec["batch"] == {**NAMED, "confirmed": True, "source": "docker state"}
    assert rec["core"]["stored"] is True
    assert Path(rec["_dir"]).parent == kernel_handler.store / "docker" / rec["container"]["id"]  # as ever
    listed = json.loads(corepipe_cli(kernel_handler.config, "list", "--job", "nightly-7", "--json").stdout)
    assert [item["id"] for item in listed] == [rec["id"]]
    assert corepipe_cli(kernel_handler.config, "list", "--task", "41").stderr == "no crashes match\n"
    info = corepipe_cli(kernel_handler.config, "info", rec["id"]).stdout
    assert "batch.job:           nightly-7" in info and "batch.from:          docker state (confirmed)" in info


def test_container_task_through_the_coredump_socket(task_image: str) -> None:
    """``corepipe serve`` identifies the container before the dump (to decide on it): the same ``batch``."""
    workdir = short_tempdir()
    try:
        with served_handler(workdir) as served:
            rec = run_task(served, task_image, "/crasher", AGENT)
        assert rec["batch"] == {**NAMED, "confirmed": True, "source": "docker state"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_container_without_the_variables_has_no_batch(kernel_handler: Handler, task_image: str) -> None:
    """Even when its process puts AZ_BATCH_JOB_ID into its own environment (the forger fills PAD with it)."""
    rec = run_task(kernel_handler, task_image, "/forger", PAD)
    assert rec["batch"] is None


def test_container_process_cannot_rewrite_its_task(kernel_handler: Handler, task_image: str) -> None:
    """The forger overwrites its AZ_BATCH_* values in place, injects another job and setenv()s: the record says
    what the agent gave the container."""
    rec = run_task(kernel_handler, task_image, "/forger", {**AGENT, **PAD})
    assert rec["batch"] == {**NAMED, "confirmed": True, "source": "docker state"}


def test_host_task_is_unconfirmed(kernel_handler: Handler, crasher: Path, forger: Path) -> None:
    crash([str(crasher), "0", "batch-host"], env=host_env(AGENT))
    rec = kernel_handler.wait_record(lambda r: r["comm"] == "batch-host")
    assert rec["container"]["runtime"] == "host"
    assert rec["batch"] == {**NAMED, "confirmed": False, "source": "process environment"}
    # What a host task's record says is what its process left in its environment: the forger's rewrite shows
    # (so the container test above proves the state wins, not that the forger failed).
    crash([str(forger)], env=host_env({**AGENT, **PAD}))
    forged = kernel_handler.wait_record(lambda r: r["comm"] == "forger")
    assert forged["batch"]["confirmed"] is False
    assert (forged["batch"]["pool"], forged["batch"]["job"]) == ("forged", "forgedxxx")
    crash([str(crasher), "0", "batch-none"], env=host_env({}))
    assert kernel_handler.wait_record(lambda r: r["comm"] == "batch-none")["batch"] is None
    # Hostile values: a terminal escape and 100 KB; recorded cut to 128 characters, the escape made harmless.
    crash([str(crasher), "0", "batch-big"], env=host_env({"AZ_BATCH_JOB_ID": "\x1b]0;owned\x07" + "j" * 100_000}))
    big = kernel_handler.wait_record(lambda r: r["comm"] == "batch-big")["batch"]
    assert big["job"] == "?]0;owned?" + "j" * 118 and big["task"] is None


def test_list_remote_by_job_across_the_pool(crasher: Path, task_image: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes ship to one Azurite container; one workstation lists the pool's crashes of a job or a task."""
    server = objectstores.make("azure", tmp_path)
    server.start()
    dirs = [short_tempdir(), short_tempdir()]
    try:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        url = server.url("crashes")
        with installed_handler(dirs[0], config_extra=f'ship_to = "{url}"\nship_node = "tvm-3"\n') as first:
            in_container = run_task(first, task_image, "/crasher", AGENT)
            first.wait_idle()
        with installed_handler(dirs[1], config_extra=f'ship_to = "{url}"\nship_node = "tvm-4"\n') as second:
            crash([str(crasher), "0", "batch-host"], env=host_env({**AGENT, "AZ_BATCH_TASK_ID": "43",
                                                                   "AZ_BATCH_NODE_ID": "tvm-4"}))
            on_host = second.wait_record(lambda r: r["comm"] == "batch-host")
            crash([str(crasher), "0", "batch-other"], env=host_env({"AZ_BATCH_JOB_ID": "weekly-1"}))
            second.wait_record(lambda r: r["comm"] == "batch-other")
            second.wait_idle()
        corepipe_cli(first.config, "ship", "--once")
        corepipe_cli(second.config, "ship", "--once")

        def remote(*args: str) -> str:
            return corepipe_cli(first.config, "list", "--remote", url, *args).stdout

        listed = json.loads(remote("--job", "nightly-7", "--json"))
        assert [(item["id"], item["node"]) for item in listed] == [(in_container["id"], "tvm-3"),
                                                                   (on_host["id"], "tvm-4")]
        assert listed[0]["batch"] == {**NAMED, "confirmed": True, "source": "docker state"}
        assert listed[1]["batch"] == {**NAMED, "task": "43", "node": "tvm-4", "confirmed": False,
                                      "source": "process environment"}
        assert [item["id"] for item in json.loads(remote("--task", "43", "--json"))] == [on_host["id"]]
        assert len(json.loads(remote("--json"))) == 3
        rows = [line.split("\t") for line in remote("--job", "nightly-7").splitlines()[1:]]
        assert [(row[0], row[3]) for row in rows] == [("tvm-3", f"{in_container['container']['name']} (nightly-7/42)"),
                                                      ("tvm-4", "host (nightly-7/43?)")]  # NODE comes first
    finally:
        server.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
