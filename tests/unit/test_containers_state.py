"""containers.enrich over runtime state files: real ones captured from Docker, Podman and runc on a test
machine (tests/fixtures/state, replayed as the root), and the failure cases (missing, malformed, symlinked,
not a regular file, out of time), which must be reported in ``errors`` and never raise."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from corepipe.domain import containers

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DOCKER_ID = "8fbe35a6874a457740ba1a4869c05bc9978f8d3b8ec868f8b9249d36988a61d2"
PODMAN_ID = "819969c35dff8658fd41b1c591d3adf5e3566c2433bc94023d15accb58e21545"
CRIO_ID = "2227daf62df6694645fee5df53c1f91271546a9560e8600a525690ae252b7f63"
POD_UID = "90d81341-92de-11e7-8cf2-507b9d4141fa"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the captured state tree, so tests may damage it."""
    shutil.copytree(FIXTURES / "state", tmp_path / "root", symlinks=True)
    return tmp_path / "root"


def _resolve(name: str, root: Path, **kwargs) -> containers.Container:
    text = (FIXTURES / "cgroup" / name).read_text()
    return containers.enrich(containers.identify(text, root=str(root)), root=str(root), **kwargs)


def test_docker_config_v2(root: Path) -> None:
    found = _resolve("docker-cgroupfs-hybrid.txt", root)
    assert (found.runtime, found.id, found.name, found.image) == ("docker", DOCKER_ID, "issue3-a", "issue3-img:1")
    assert found.details["image_id"].startswith("sha256:")
    assert (found.source, found.confidence, found.errors) == ("cgroup+state", "likely", [])
    # State alone is not an identity: without the process to check (test_container_trust.py), it stays unconfirmed.
    assert "namespaces are not known" in found.details["unconfirmed"]


def test_docker_data_root_from_daemon_json(root: Path) -> None:
    (root / "srv").mkdir()
    (root / "var/lib/docker").rename(root / "srv/docker")
    assert _resolve("docker-cgroupfs-hybrid.txt", root).confidence == "likely"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text(json.dumps({"data-root": "/srv/docker"}))
    assert _resolve("docker-cgroupfs-hybrid.txt", root).name == "issue3-a"


def test_docker_kubernetes_labels(root: Path) -> None:
    config_file = root / "var/lib/docker/containers" / DOCKER_ID / "config.v2.json"
    config = json.loads(config_file.read_text())
    config["Config"]["Labels"] = {"io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace": "shop",
                                  "io.kubernetes.pod.uid": POD_UID, "io.kubernetes.container.name": "app"}
    config_file.write_text(json.dumps(config))
    found = _resolve("docker-cgroupfs-hybrid.txt", root)
    assert (found.pod_name, found.pod_namespace, found.pod_uid) == ("web-1", "shop", POD_UID)
    assert found.details["labels"]["io.kubernetes.container.name"] == "app"


BATCH_ENV = ["AZ_BATCH_POOL_ID=pool-1", "AZ_BATCH_JOB_ID=nightly-7", "AZ_BATCH_TASK_ID=42", "AZ_BATCH_NODE_ID=tvm-3"]
BATCH = {"pool": "pool-1", "job": "nightly-7", "task": "42", "node": "tvm-3"}


def test_docker_batch_variables_from_config_env(root: Path) -> None:
    """The Batch agent's variables in Config.Env; {} (read, none there) for a container without them."""
    assert _resolve("docker-cgroupfs-hybrid.txt", root).batch == {}
    config_file = root / "var/lib/docker/containers" / DOCKER_ID / "config.v2.json"
    config = json.loads(config_file.read_text())
    config["Config"]["Env"] = ["PATH=/bin", *BATCH_ENV]
    config_file.write_text(json.dumps(config))
    found = _resolve("docker-cgroupfs-hybrid.txt", root)
    assert found.batch == BATCH and "batch" not in found.to_dict()


def test_bundle_batch_variables_from_process_env(root: Path) -> None:
    """containerd and runc: the OCI config.json's process.env, read with its annotations."""
    assert _resolve("runc-cgroupfs-hybrid.txt", root).batch == {}
    config_file = root / "bundles/issue3-r1/config.json"
    config = json.loads(config_file.read_text())
    config["process"]["env"] += BATCH_ENV
    config_file.write_text(json.dumps(config))
    assert _resolve("runc-cgroupfs-hybrid.txt", root).batch == BATCH


def test_podman_storage(root: Path) -> None:
    found = _resolve("podman-cgroupfs-hybrid.txt", root)
    assert (found.name, found.image) == ("issue3-p", "localhost/issue3-img:1")
    assert found.details["storage_driver"] == "overlay" and "+state" in found.source


def test_podman_image_name_from_images_json(root: Path) -> None:
    """Without the image name in the container's metadata, images.json names the image."""
    listing = root / "var/lib/containers/storage/overlay-containers/containers.json"
    entries = json.loads(listing.read_text())
    entries[0]["metadata"] = "{}"
    listing.write_text(json.dumps(entries))
    assert _resolve("podman-cgroupfs-hybrid.txt", root).image == "localhost/issue3-img:1"


def test_podman_vfs_and_missing(root: Path) -> None:
    storage = root / "var/lib/containers/storage"
    (storage / "overlay-containers").rename(storage / "vfs-containers")
    (storage / "overlay-images").rename(storage / "vfs-images")
    found = _resolve("podman-cgroupfs-hybrid.txt", root)
    assert (found.name, found.details["storage_driver"]) == ("issue3-p", "vfs")
    shutil.rmtree(storage)
    found = _resolve("podman-cgroupfs-hybrid.txt", root)
    assert found.name is None and found.confidence == "likely"
    assert found.errors and "containers/storage" in found.errors[0]


def test_runc_state_and_bundle(root: Path) -> None:
    found = _resolve("runc-cgroupfs-hybrid.txt", root)
    assert (found.runtime, found.id, found.name, found.image) == ("runc", "issue3-r1", "issue3-r1", "busybox-crasher")
    assert found.details["bundle"] == "/bundles/issue3-r1" and found.details["state_cgroup_matches"] is True
    assert "+state" in found.source and found.errors == []


def test_crio_annotations(root: Path) -> None:
    """CRI-O's bundle config.json annotations (keys as CRI-O writes them) give pod, container and image."""
    userdata = root / "run/containers/storage/overlay-containers" / CRIO_ID / "userdata"
    userdata.mkdir(parents=True)
    (userdata / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.container.name": "app", "io.kubernetes.pod.name": "web-1",
        "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": POD_UID,
        "io.kubernetes.cri-o.ImageName": "quay.io/shop/web:1.2", "io.kubernetes.cri-o.ContainerType": "container"}}))
    found = _resolve("k8s-systemd-burstable-crio-v1.txt", root)
    assert (found.runtime, found.name, found.image) == ("cri-o", "app", "quay.io/shop/web:1.2")
    assert (found.pod_name, found.pod_namespace, found.pod_uid) == ("web-1", "shop", POD_UID)
    assert found.details["qos"] == "burstable" and "+state" in found.source


def test_kubernetes_cgroupfs_runtime_from_state(root: Path) -> None:
    """A bare id below a pod: the runtime whose state has it is the answer (here containerd's CRI namespace)."""
    cid = "cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c"
    found = _resolve("k8s-cgroupfs-besteffort-v1.txt", root)
    assert found.runtime == "kubernetes" and found.errors
    state_dir = root / "run/containerd/runc/k8s.io" / cid
    state_dir.mkdir(parents=True)
    bundle = root / "run/containerd/io.containerd.runtime.v2.task/k8s.io" / cid
    bundle.mkdir(parents=True)
    (state_dir / "state.json").write_text(json.dumps({"config": {"labels": [f"bundle=/{bundle.relative_to(root)}"]}}))
    (bundle / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-name": "app", "io.kubernetes.cri.sandbox-name": "web-1",
        "io.kubernetes.cri.sandbox-namespace": "shop", "io.kubernetes.cri.image-name": "shop/web:1"}}))
    found = _resolve("k8s-cgroupfs-besteffort-v1.txt", root)
    assert (found.runtime, found.name, found.pod_name, found.pod_namespace, found.image) == (
        "containerd", "app", "web-1", "shop", "shop/web:1")
    assert found.pod_uid == "74ba62da-1a3d-11e7-bb11-080027cb0e22" and "+state" in found.source


def test_lxc_and_nspawn_managers(root: Path) -> None:
    (root / "var/lib/incus/containers/web1").mkdir(parents=True)
    found = _resolve("lxc-payload-v2.txt", root)
    # The directory names the manager; only its monitor's answer (test_container_trust) confirms the container.
    assert found.details["manager"] == "incus" and "+state" not in found.source
    assert "no monitor answers for web1 (not running)" in found.errors[0]
    (root / "run/systemd/machines").mkdir(parents=True)
    machine = root / "run/systemd/machines/debian-test"
    machine.write_text("NAME=debian-test\nCLASS=container\nROOT=/var/lib/machines/d\n")
    found = _resolve("nspawn-v2.txt", root)
    assert (found.details["class"], found.details["root"]) == ("container", "/var/lib/machines/d")


@pytest.mark.parametrize("damage", ["malformed", "symlink", "fifo", "not-a-dict"])
def test_bad_state_is_an_error_not_a_crash(root: Path, tmp_path: Path, damage: str) -> None:
    config_file = root / "var/lib/docker/containers" / DOCKER_ID / "config.v2.json"
    config_file.unlink()
    if damage == "malformed":
        config_file.write_text("{not json")
    elif damage == "symlink":
        (tmp_path / "elsewhere.json").write_text(json.dumps({"Name": "/planted"}))
        config_file.symlink_to(tmp_path / "elsewhere.json")
    elif damage == "fifo":
        os.mkfifo(config_file)
    else:
        config_file.write_text("[1, 2]")
    found = _resolve("docker-cgroupfs-hybrid.txt", root)
    assert found.runtime == "docker" and found.id == DOCKER_ID
    assert found.name is None and found.confidence == "likely"
    assert len(found.errors) == 1 and found.errors[0].startswith("docker state:")


def test_time_budget(root: Path) -> None:
    found = _resolve("docker-cgroupfs-hybrid.txt", root, budget=-1)
    assert found.name is None and "time budget" in found.errors[0]
