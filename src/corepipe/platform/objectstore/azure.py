"""Azure Blob Storage through azure-storage-blob (the ``azure`` extra).

Credentials, from the shipper's own environment: ``AZURE_STORAGE_ACCOUNT_URL`` with
``AZURE_STORAGE_SAS_TOKEN`` (or a SAS in the URL) or else azure-identity's DefaultAzureCredential
(managed identity on an Azure Batch pool, workload identity on AKS, az login on a workstation);
otherwise ``AZURE_STORAGE_CONNECTION_STRING``.

A large blob is staged as blocks (each checked by the service against its MD5) and committed by one
Put Block List: until then the blob does not exist, and after a restart the uncommitted blocks
already staged are reused.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import sys
from typing import Callable, Optional
from urllib.parse import unquote, urlencode
from xml.etree import ElementTree

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.core.rest import HttpRequest
from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings, ExponentialRetry

from corepipe.platform import extras
from corepipe.platform.objectstore import parts
from corepipe.platform.objectstore.base import DestinationError, Location, ObjectInfo

MAX_BLOCKS = 50000
# The SDK's warnings (each credential the identity chain tried, each retry) would be many lines per failure;
# the one line the shipper prints says what failed and what to check.
logging.getLogger("azure").setLevel(logging.ERROR)
_AUTH_CODES = {"AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch",
               "InvalidAuthenticationInfo", "NoAuthenticationInformation"}


def _service(retries: int) -> BlobServiceClient:
    # Quick retries (1 s, 3 s, 5 s): the shipper retries a failed crash itself with a longer backoff.
    options = {"retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=retries,
                                                random_jitter_range=1),
               "connection_timeout": 20, "read_timeout": 300}
    url = os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
    if url:
        sas = os.environ.get("AZURE_STORAGE_SAS_TOKEN")
        if sas or "sig=" in url:
            return BlobServiceClient(url, credential=sas, **options)
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise DestinationError("AZURE_STORAGE_ACCOUNT_URL without a SAS needs "
                                   f"{extras.missing('azure', 'azure.identity')}") from None
        try:
            return BlobServiceClient(url, credential=DefaultAzureCredential(), **options)
        except ValueError as exc:
            raise DestinationError(f"AZURE_STORAGE_ACCOUNT_URL={url}: {exc}", auth=True) from None
    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection:
        try:
            return BlobServiceClient.from_connection_string(connection, **options)
        except ValueError as exc:
            raise DestinationError(f"AZURE_STORAGE_CONNECTION_STRING is not usable: {exc}", auth=True) from None
    raise DestinationError("az:// needs AZURE_STORAGE_ACCOUNT_URL (managed or workload identity, or a SAS) or "
                           "AZURE_STORAGE_CONNECTION_STRING in the shipper's environment", auth=True)


def _error(exc: Exception, what: str) -> DestinationError:
    code = getattr(exc, "error_code", None)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, ClientAuthenticationError) and status is None:  # no token from the identity chain
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return DestinationError(f"{what}: no Azure credential worked ({reason}); set AZURE_CLIENT_ID for a "
                                "user-assigned identity, or use AZURE_STORAGE_CONNECTION_STRING / a SAS", auth=True)
    if isinstance(exc, ClientAuthenticationError) or code in _AUTH_CODES or status in (401, 403):
        return DestinationError(f"{what}: access denied ({code or status}); check the credentials "
                                "(AZURE_STORAGE_CONNECTION_STRING, the SAS, or the identity's role on the container)",
                                auth=True)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DestinationError(f"{what}: {reason[:300]}")


def _block_id(number: int) -> str:
    return base64.b64encode(f"corepipe-{number:08d}".encode()).decode()


def _info(key: str, props: object) -> ObjectInfo:
    md5 = props.content_settings.content_md5  # type: ignore[attr-defined]
    return ObjectInfo(key=key, size=props.size, metadata=dict(props.metadata or {}),  # type: ignore[attr-defined]
                      checksum=base64.b64encode(md5).decode() if md5 else None,
                      etag=props.etag)  # type: ignore[attr-defined]


class AzureDestination:
    #: Blobs per listing page: the service's maximum.
    page = 5000

    def __init__(self, location: Location, concurrency: int = 4, bandwidth: int = 0, retries: int = 3):
        self.location = location
        self.concurrency = concurrency
        self.bandwidth = bandwidth
        self.container = _service(retries).get_container_client(location.bucket)

    def _call(self, what: str, function: Callable, *args: object, **kwargs: object) -> object:
        try:
            return function(*args, **kwargs)
        except DestinationError:
            raise
        except (AzureError, OSError) as exc:
            raise _error(exc, what) from None

    def head(self, key: str) -> Optional[ObjectInfo]:
        try:
            props = self.container.get_blob_client(key).get_blob_properties()
        except ResourceNotFoundError:
            return None
        except (AzureError, OSError) as exc:
            raise _error(exc, f"HEAD {key}") from None
        return _info(key, props)

    def put_small(self, key: str, data: bytes, metadata: dict) -> ObjectInfo:
        md5 = hashlib.md5(data).digest()
        blob = self.container.get_blob_client(key)
        self._call(f"upload {key}", blob.upload_blob, data, overwrite=True, metadata=metadata,
                   validate_content=True, content_settings=ContentSettings(content_md5=bytearray(md5)))
        info = self.head(key)
        if info is None or info.size != len(data) or info.checksum != base64.b64encode(md5).decode():
            raise DestinationError(f"{key} read back as {info and info.size} bytes, MD5 {info and info.checksum}; "
                                   f"expected {len(data)} bytes, MD5 {base64.b64encode(md5).decode()}")
        return info

    def same(self, key: str, fd: int, size: int) -> Optional[ObjectInfo]:
        info = self.head(key)
        if info is None or info.size != size or info.checksum is None:
            return None
        # The service computes Content-MD5 only for a blob put in one request; after Put Block List the property
        # is whatever the writer set: a blob with committed blocks is not judged by it.
        committed, _ = self._call(f"read back {key}", self.container.get_blob_client(key).get_block_list,
                                  "committed")  # type: ignore[misc]
        if committed:
            return None
        md5 = parts.file_digests(fd, size, max(size, 1), hashlib.md5)[0].digest()
        return info if base64.b64encode(md5).decode() == info.checksum else None

    def create(self, key: str, data: bytes, metadata: dict) -> bool:
        blob = self.container.get_blob_client(key)
        try:  # overwrite=False sends If-None-Match: *; the service answers 409 BlobAlreadyExists
            blob.upload_blob(data, overwrite=False, metadata=metadata, validate_content=True)
        except ResourceExistsError:
            return False
        except (AzureError, OSError) as exc:
            raise _error(exc, f"create {key}") from None
        return True

    def put_large(self, key: str, fd: int, size: int, progress: dict, save: Callable[[dict], None],
                  metadata: dict, check: Optional[parts.Check] = None) -> ObjectInfo:
        blob = self.container.get_blob_client(key)
        part_size, concurrency = parts.plan(size, MAX_BLOCKS, concurrency=self.concurrency)
        if progress.get("completed") and progress.get("key") == key and progress.get("size") == size:
            try:
                return self._verify_blocks(blob, key, size, part_size)
            except DestinationError as exc:
                if exc.auth:
                    raise
                progress.clear()  # completed, then found damaged (or gone): uploaded again, never re-verified forever
        if progress.get("key") != key or progress.get("part_size") != part_size or progress.get("size") != size:
            progress.clear()
            progress.update({"key": key, "part_size": part_size, "size": size, "blocks": {}})
        staged = self._staged(blob, key) if progress["blocks"] else {}
        # Only blocks the service still holds, with the size we staged, are reused after a restart; when they
        # cannot be listed, every block is staged again (a block staged under an id replaces the one before).
        finished = {int(n): True for n, length in progress["blocks"].items()
                    if staged.get(_block_id(int(n))) == length}
        progress["blocks"] = {n: progress["blocks"][n] for n in progress["blocks"] if int(n) in finished}
        save(progress)

        def send(number: int, data: bytes) -> int:
            self._call(f"upload {key} block {number}", blob.stage_block, _block_id(number), data,
                       length=len(data), validate_content=True)
            return len(data)

        parts.upload_recorded(fd, size, part_size, concurrency, finished, send, progress, "blocks", save,
                              parts.Bandwidth(self.bandwidth), check)
        count = (size + part_size - 1) // part_size
        self._call(f"commit {key}", blob.commit_block_list, [BlobBlock(_block_id(n)) for n in range(1, count + 1)],
                   metadata=metadata)
        progress["completed"] = True
        save(progress)
        return self._verify_blocks(blob, key, size, part_size)

    def _staged(self, blob: object, key: str) -> dict:
        """The uncommitted blocks' sizes by id; none (a fresh upload, with one warning) when they cannot be listed:
        a failure to resume never stops the node, and with bad credentials the upload itself fails and says so."""
        try:
            _committed, uncommitted = blob.get_block_list("uncommitted")  # type: ignore[attr-defined]
        except ResourceNotFoundError:
            return {}
        except (AzureError, OSError) as exc:
            error = _error(exc, f"list the staged blocks of {key}")
            why = (f"list the staged blocks of {key}: access denied: resuming an upload needs blob read (Storage "
                   "Blob Data Contributor, or a SAS with r)" if error.auth else str(error))
            print(f"corepipe ship: warning: {why}; uploading it afresh", file=sys.stderr)
            return {}
        return {block.id: block.size for block in uncommitted}

    def _verify_blocks(self, blob: object, key: str, size: int, part_size: int) -> ObjectInfo:
        """The committed block list (each block was checked against its MD5 when staged) and the blob's size,
        as the service reports them."""
        committed, _ = self._call(f"read back {key}", blob.get_block_list, "committed")  # type: ignore
        expected = [(_block_id(n + 1), min(part_size, size - n * part_size))
                    for n in range((size + part_size - 1) // part_size)]
        info = self.head(key)
        if info is None or info.size != size or [(b.id, b.size) for b in committed] != expected:
            raise DestinationError(f"{key} read back as {info and info.size} bytes in {len(committed)} blocks; "
                                   f"expected {size} bytes")
        return info

    def list(self, prefix: str) -> list:
        """Key, size and ETag of each blob, read from the List Blobs XML itself: the SDK's
        list_blobs builds a model object per blob in Python, 0.45-0.6 ms each (docs/shipping.md, "Fleet
        benchmark"). The request goes through the client's own pipeline: its credential, retries and timeouts."""
        found: list = []
        marker = ""
        while True:
            body = self._call(f"list {self.location.url}", self._list_page, prefix, marker)
            try:
                page = ElementTree.fromstring(body)  # type: ignore[arg-type]
                for blob in page.iter("Blob"):
                    name = blob.find("Name")
                    key = (name.text or "") if name is not None else ""
                    if name is not None and name.get("Encoded") == "true":  # a name XML cannot carry as it is
                        key = unquote(key)
                    found.append(ObjectInfo(key=key, size=int(blob.findtext("Properties/Content-Length") or 0),
                                            etag=blob.findtext("Properties/Etag")))
            except (ElementTree.ParseError, ValueError) as exc:
                raise DestinationError(f"list {self.location.url}: not a listing the service sends ({exc})") from None
            marker = page.findtext("NextMarker") or ""
            if not marker:
                return found

    def _list_page(self, prefix: str, marker: str) -> bytes:
        base, _, sas = self.container.url.partition("?")
        query = urlencode({"restype": "container", "comp": "list", "prefix": prefix, "maxresults": self.page,
                           **({"marker": marker} if marker else {})})
        request = HttpRequest("GET", f"{base}?{query}" + (f"&{sas}" if sas else ""),
                              headers={"x-ms-version": self.container.api_version})
        response = self.container._pipeline.run(request, stream=True).http_response  # noqa: SLF001 - see list
        body = response.read()
        if response.status_code != 200:
            code = response.headers.get("x-ms-error-code")
            error = HttpResponseError(message=f"{code or 'HTTP'} ({response.status_code})", response=response)
            error.error_code = code
            raise error
        return body

    def get(self, key: str, write: Callable[[bytes], object]) -> int:
        def go() -> int:
            total = 0
            for chunk in self.container.get_blob_client(key).download_blob(max_concurrency=2).chunks():
                write(chunk)
                total += len(chunk)
            return total
        return self._call(f"download {key}", go)  # type: ignore[return-value]

    def delete(self, key: str) -> None:
        def go() -> None:
            try:
                self.container.get_blob_client(key).delete_blob()
            except ResourceNotFoundError:
                pass  # already gone: a deletion retried after a failure half-way
        self._call(f"delete {key}", go)


def open(location: Location, **options: object) -> AzureDestination:  # noqa: A001 - the adapters' entry point
    return AzureDestination(location, **options)  # type: ignore[arg-type]
