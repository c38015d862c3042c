"""Amazon ECS: ``/ecs/[<cluster>/]<task>/<id>``; EKS on Fargate nests the kubelet's pods in ``/ecs/<task>/...``.

On EC2 the id is Docker's 64-hex id (the Docker state then gives name, image and the ECS
labels); Fargate's ``<task>-<n>`` ids have no local state.
"""

from __future__ import annotations

import re
from typing import Optional

from corepipe.domain.containers import docker
from corepipe.domain.containers.model import Container
from corepipe.domain.containers.state import HEX_ID, NAME

FARGATE_ID = re.compile(r"[0-9a-f]{32}-[0-9]{1,12}")
ENRICHES = ("ecs",)


def match(segments: list, root: str) -> Optional[tuple]:
    if "ecs" not in segments:
        return None
    start = segments.index("ecs")
    for i in range(start + 2, min(start + 4, len(segments))):
        seg = segments[i]
        if HEX_ID.fullmatch(seg) or FARGATE_ID.fullmatch(seg):
            details = {"ecs_task": segments[i - 1]}
            if i - start == 3 and NAME.fullmatch(segments[start + 1]):
                details["ecs_cluster"] = segments[start + 1]
            runtime = docker.NAME if HEX_ID.fullmatch(seg) else "ecs"
            return i, Container(runtime=runtime, id=seg, details=details)
    if start + 2 < len(segments) and NAME.fullmatch(segments[start + 1]):
        # A task whose containers are not ECS's own (EKS on Fargate: the kubelet's pods inside the task).
        task = segments[start + 1]
        return start + 1, Container(runtime="ecs", id=task, details={"ecs_task": task})
    return None


def enrich(container: Container, deadline: object, root: str) -> None:
    return None  # Fargate: nothing on this host describes the task
