"""Kubernetes pods under containerd (CRI) or CRI-O: ``kubepods`` paths and ``cri-containerd-``/``crio-`` scopes."""

from __future__ import annotations

from typing import Optional

from corepipe.containers import HEX_ID, Container

NAME = "containerd"
ALSO = ("cri-o",)
_PREFIXES = (("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("docker-", "docker"))


def match(segments: list) -> Optional[Container]:
    pod_uid = None
    in_kubepods = False
    for seg in segments:
        if seg.startswith("kubepods"):
            in_kubepods = True
            uid = _pod_uid(seg)
            pod_uid = uid or pod_uid
            continue
        for prefix, runtime in _PREFIXES:
            if seg.startswith(prefix) and seg.endswith(".scope") and not seg.startswith("crio-conmon-"):
                cid = seg[len(prefix):-6]
                if HEX_ID.fullmatch(cid) and (in_kubepods or runtime != "docker"):
                    return Container(runtime=runtime, id=cid, pod_uid=pod_uid)
        if in_kubepods and seg.startswith("pod"):
            pod_uid = _pod_uid(seg) or pod_uid
            continue
        if in_kubepods and HEX_ID.fullmatch(seg):
            return Container(runtime="containerd", id=seg, pod_uid=pod_uid, confidence="likely")
    return None


def _pod_uid(seg: str) -> Optional[str]:
    """``pod<uid>`` (cgroupfs) or ``kubepods-besteffort-pod<uid_with_underscores>.slice`` (systemd)."""
    start = seg.rfind("pod")
    if start < 0 or seg.startswith("kubepods") and "-pod" not in seg:
        return None
    uid = seg[start + 3:]
    if uid.endswith(".slice"):
        uid = uid[:-6]
    uid = uid.replace("_", "-")
    if len(uid) == 36 and all(c in "0123456789abcdef-" for c in uid):
        return uid
    return None


def enrich(container: Container, deadline: float) -> None:
    return None
