"""What every destination shares: the URL, the errors, what a store says about an object, the protocol."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from corepipe.platform.errors import UsageError, UserError

_URL = re.compile(r"(az|s3)://([a-z0-9][a-z0-9.-]{1,62})(?:/(.*))?")


class DestinationError(UserError):
    """A request failed; ``auth`` is set when retrying cannot help until the credentials are fixed."""

    def __init__(self, message: str, auth: bool = False):
        super().__init__(message)
        self.auth = auth


class BadDestination(UsageError, ValueError):
    """A URL that names no destination (exit code 2); a ValueError too, for callers that check a setting."""


@dataclass
class ObjectInfo:
    """What a HEAD or a listing says about one object."""

    key: str
    size: int
    metadata: dict = field(default_factory=dict)
    #: Azure's Content-MD5 (base64) as read back, if any; S3's answer is its ETag.
    checksum: Optional[str] = None
    etag: Optional[str] = None


@dataclass
class Location:
    scheme: str
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


class Destination(Protocol):
    location: Location

    def head(self, key: str) -> Optional[ObjectInfo]:
        """The object's size, metadata and stored checksum; None if it does not exist."""

    def put_small(self, key: str, data: bytes, metadata: dict) -> ObjectInfo:
        """Upload in one request with a checksum the store checks; returns what the store read back."""

    def put_large(self, key: str, fd: int, size: int, progress: dict, save: Callable[[dict], None],
                  metadata: dict, check: Optional[object] = None) -> ObjectInfo:
        """Upload in parts, resuming from ``progress`` (persisted by ``save`` after each part), commit last,
        and only once ``check`` (parts.Check) has seen every byte and passed."""

    def same(self, key: str, fd: int, size: int) -> Optional[ObjectInfo]:
        """The object at ``key`` if the checksum the store computed of it is that of the ``size`` bytes of ``fd``
        (so another node's object need not be sent again); None if it is absent, differs, or the store computed
        none it can be judged by. Metadata is never trusted for this: any node could have written it."""

    def create(self, key: str, data: bytes, metadata: dict) -> bool:
        """Create the object only if no object has ``key`` (a conditional create, decided by the store: of two
        writers at once exactly one wins); False if one has."""

    def list(self, prefix: str) -> list:
        """ObjectInfo (key, size and ETag; no metadata) of every object whose key starts with ``prefix``."""

    def get(self, key: str, write: Callable[[bytes], object]) -> int:
        """Stream the object's bytes to ``write``; returns the byte count."""

    def delete(self, key: str) -> None:
        """Delete the object; one that is already gone is no error (a retried deletion)."""


def parse(url: str) -> Location:
    """``az://CONTAINER/PREFIX`` or ``s3://BUCKET/PREFIX``; BadDestination (a ValueError) says what is wrong."""
    match = _URL.fullmatch(url.strip())
    if not match:
        raise BadDestination(f"{url!r} is not a destination (use az://CONTAINER/PREFIX or s3://BUCKET/PREFIX)")
    prefix = (match.group(3) or "").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise BadDestination(f"{url!r}: the prefix must not have empty, '.' or '..' parts")
    return Location(match.group(1), match.group(2), prefix)


def is_url(text: str) -> bool:
    """Whether ``text`` names a destination rather than a local path."""
    return bool(_URL.match(text))
