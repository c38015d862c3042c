"""The storage policy's decisions, from made-up store contents (no disk involved)."""

from __future__ import annotations

from corepipe.domain import policy
from corepipe.domain.policy import Core, Limits

MIB = 1 << 20


def core(group: str, n: int, size: int = MIB) -> Core:
    return Core(group=group, crash=f"2026010{n}T000000Z-{n:012x}", size=size, time=1000.0 + n, file="core.zst")


def test_automatic_limits_are_a_share_of_the_filesystem_with_a_cap() -> None:
    lim = policy.limits(max_use=-1, keep_free=-1, container_max_cores=0, container_max_bytes=0, fs_size=100 * MIB)
    assert lim.max_use == 10 * MIB and lim.keep_free == 15 * MIB
    big = policy.limits(max_use=-1, keep_free=-1, container_max_cores=0, container_max_bytes=0, fs_size=1 << 50)
    assert big.max_use == 4 << 30 and big.keep_free == 4 << 30
    fixed = policy.limits(max_use=0, keep_free=123, container_max_cores=0, container_max_bytes=0, fs_size=1 << 50)
    assert fixed.max_use == 0 and fixed.keep_free == 123


def test_nothing_deleted_when_everything_fits() -> None:
    cores = [core("host", 1), core("docker/a", 2)]
    plan = policy.plan(cores, Limits(max_use=100 * MIB), fs_free=1 << 40, group="host", want=MIB)
    assert plan.delete == [] and plan.budget == 98 * MIB and plan.limited_by.startswith("max_use")


def test_container_max_cores_deletes_the_oldest_of_that_container_only() -> None:
    cores = [core("docker/a", 1), core("docker/b", 2), core("docker/a", 3), core("docker/a", 4)]
    plan = policy.plan(cores, Limits(container_max_cores=2), fs_free=1 << 40, group="docker/a", want=MIB)
    assert [c for c, _ in plan.delete] == [cores[0], cores[2]]
    assert all("container_max_cores" in reason for _, reason in plan.delete)


def test_container_max_bytes_leaves_room_for_the_new_core() -> None:
    cores = [core("docker/a", 1, 3 * MIB), core("docker/a", 2, 3 * MIB), core("docker/b", 3, 50 * MIB)]
    plan = policy.plan(cores, Limits(container_max_bytes=8 * MIB), fs_free=1 << 40, group="docker/a", want=4 * MIB)
    assert [c for c, _ in plan.delete] == [cores[0]]
    assert plan.budget == 5 * MIB and plan.limited_by.startswith("container_max_bytes")


def test_max_use_takes_the_oldest_cores_of_the_biggest_container() -> None:
    small = [core("docker/small", 1, 2 * MIB)]
    big = [core("docker/big", 2, 4 * MIB), core("docker/big", 3, 4 * MIB), core("docker/big", 4, 4 * MIB)]
    plan = policy.plan(small + big, Limits(max_use=16 * MIB), fs_free=1 << 40, group="docker/small", want=5 * MIB)
    # 14 MiB used + 5 MiB wanted > 16 MiB: the biggest container's oldest core goes, not the older small one.
    assert [c for c, _ in plan.delete] == [big[0]]
    assert "docker/big uses the most" in plan.delete[0][1]
    assert plan.budget == 6 * MIB


def test_keep_free_counts_what_deleting_frees() -> None:
    cores = [core("host", 1, 10 * MIB), core("host", 2, 10 * MIB), core("host", 3, 10 * MIB)]
    plan = policy.plan(cores, Limits(keep_free=20 * MIB), fs_free=15 * MIB, group="docker/x", want=10 * MIB)
    # Two go (host keeps one: the new group will have one); what they free counts as free.
    assert [c for c, _ in plan.delete] == cores[:2]
    assert plan.budget == 35 * MIB - 20 * MIB - policy.MARGIN


def test_a_new_group_never_evicts_a_group_of_as_few_cores() -> None:
    """Issue 30 item 7: with max_use full of one-core groups (a flood of fresh groups), a new group gets no room
    instead of another group's only core; a group with more cores than it will have still gives room."""
    flood = [core(f"uid/{100000 + n}", n, 4 * MIB) for n in range(1, 5)]
    plan = policy.plan(flood, Limits(max_use=16 * MIB), fs_free=1 << 40, group="uid/100009", want=4 * MIB)
    assert plan.delete == [] and plan.budget == 0 and plan.limited_by.startswith("max_use")
    # Its own older cores still make room for it, and a hoarding group gives room too.
    own = flood[:3] + [core("uid/100009", 5, 4 * MIB)]
    plan = policy.plan(own, Limits(max_use=16 * MIB), fs_free=1 << 40, group="uid/100009", want=4 * MIB)
    assert [c for c, _ in plan.delete] == [own[3]] and plan.budget == 4 * MIB
    hoard = [core("uid/1000", n, 4 * MIB) for n in range(1, 5)]
    plan = policy.plan(hoard, Limits(max_use=16 * MIB), fs_free=1 << 40, group="uid/2000", want=4 * MIB)
    assert [c for c, _ in plan.delete] == [hoard[0]] and plan.budget == 4 * MIB


def test_no_room_when_nothing_can_be_deleted() -> None:
    plan = policy.plan([], Limits(keep_free=20 * MIB), fs_free=10 * MIB, group="host", want=MIB)
    assert plan.delete == [] and plan.budget == 0 and plan.limited_by.startswith("keep_free")


def test_reservations_of_running_handlers_count_as_used() -> None:
    plan = policy.plan([], Limits(max_use=10 * MIB), fs_free=1 << 40, reserved=7 * MIB, group="host", want=MIB)
    assert plan.budget == 3 * MIB


def test_cores_without_a_file_are_never_candidates() -> None:
    gone = Core(group="host", crash="20260101T000000Z-000000000000", size=0, time=1.0, file=None)
    plan = policy.plan([gone], Limits(container_max_cores=1), fs_free=1 << 40, group="host", want=MIB)
    assert plan.delete == []


def test_prune_brings_every_container_within_its_limits() -> None:
    cores = [core("docker/a", i) for i in range(1, 5)] + [core("docker/b", i) for i in range(5, 7)]
    plan = policy.plan(cores, Limits(container_max_cores=3), fs_free=1 << 40)
    assert [c for c, _ in plan.delete] == [cores[0]]
    assert plan.budget == 0


def test_expired() -> None:
    cores = [core("host", 1), core("host", 2)]
    assert policy.expired(cores, now=1001.5 + 86400, max_age_days=1) == [cores[0]]
    assert policy.expired(cores, now=1e12, max_age_days=0) == []


def test_rate_limit_window() -> None:
    allowed, recent = policy.rate_allows([10.0, 50.0, 95.0], now=100.0, window=60, limit=2)
    assert recent == [50.0, 95.0] and not allowed
    allowed, recent = policy.rate_allows([10.0, 95.0, "junk"], now=100.0, window=60, limit=2)
    assert recent == [95.0] and allowed
    assert policy.rate_allows([1.0] * 100, now=1.0, window=60, limit=0)[0]


def test_estimate() -> None:
    assert policy.estimate(None, None, None) is None
    assert policy.estimate(None, None, 5) == 5
    assert policy.estimate(1024, 1000 * 1024, None) == MIB + 1024 * 1024 + MIB
    assert policy.estimate(1 << 30, None, 4096) == 4096 + MIB


def test_excluded_by_pattern() -> None:
    none = {"executables": [], "containers": [], "images": []}
    host = {"exe": "/usr/bin/python3.11", "container_name": None, "container_id": None, "image": None}
    web = {"exe": "/app/server", "container_name": "web-1", "container_id": "ab" * 32, "image": "nginx:1.25"}
    assert policy.excluded(**host, **none) is None
    assert policy.excluded(**host, **{**none, "executables": ["*/python3*"]}) == (
        "not stored: excluded by config (exclude_executables: '/usr/bin/python3.11' matches '*/python3*')")
    assert policy.excluded(**host, **{**none, "containers": ["*"], "images": ["*"]}) is None, "a host process"
    assert policy.excluded(**web, **{**none, "containers": ["web-*"]}).endswith("'web-1' matches 'web-*')")
    assert policy.excluded(**web, **{**none, "containers": ["abab*"]}) is not None, "by id too"
    assert policy.excluded(**web, **{**none, "images": ["nginx:*"]}).startswith(
        "not stored: excluded by config (exclude_images: ")
    assert policy.excluded(**web, **{**none, "images": ["NGINX:*"], "executables": ["server"]}) is None
