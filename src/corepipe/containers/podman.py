"""Podman: ``libpod-<id>`` (cgroupfs driver, under ``libpod_parent``) and ``libpod-<id>.scope`` (systemd)."""

from __future__ import annotations

from typing import Optional

from corepipe.containers import HEX_ID, Container

NAME = "podman"


def match(segments: list) -> Optional[Container]:
    for seg in segments:
        if seg.startswith("libpod-") and not seg.startswith("libpod-conmon-"):
            cid = seg[7:-6] if seg.endswith(".scope") else seg[7:]
            if HEX_ID.fullmatch(cid):
                return Container(runtime=NAME, id=cid)
    return None


def enrich(container: Container, deadline: float) -> None:
    return None
