"""Object stores that crashes are shipped to: one small adapter per vendor SDK, imported only when used.

A destination is a URL: ``az://CONTAINER/PREFIX`` (Azure Blob Storage, azure-storage-blob) or
``s3://BUCKET/PREFIX`` (S3 and S3-compatible stores, boto3). Every adapter offers the same few
operations (``Destination``); a large object is uploaded in parts that are invisible until the
last call commits them, so a store never holds an object that looks complete but is not.
"""

from __future__ import annotations

from corepipe.platform.objectstore.base import (
    BadDestination,
    Destination,
    DestinationError,
    Location,
    ObjectInfo,
    is_url,
    parse,
)

__all__ = ["BadDestination", "Destination", "DestinationError", "Location", "ObjectInfo", "open_destination", "parse",
           "is_url"]


def open_destination(url: str, **options: object) -> Destination:
    """The adapter for ``url``; its SDK is imported here, never on the collect path."""
    location = parse(url)
    try:
        if location.scheme == "az":
            from corepipe.platform.objectstore import azure as vendor
        else:
            from corepipe.platform.objectstore import s3 as vendor  # type: ignore[no-redef]
    except ImportError as exc:
        from corepipe.platform import extras

        extra = "azure" if location.scheme == "az" else "s3"
        raise DestinationError(f"{location.scheme}:// needs {extras.missing(extra, str(exc.name))}") from None
    return vendor.open(location, **options)
