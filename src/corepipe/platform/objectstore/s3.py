"""S3 and S3-compatible stores through boto3 (the ``s3`` extra).

Credentials come from boto3's standard chain in the shipper's own environment (variables, profile,
IRSA / web identity, instance metadata); ``AWS_ENDPOINT_URL`` points it at an S3-compatible store.

A small object's body carries its MD5 (Content-MD5, which S3 checks before it stores anything)
and the ETag the store answers is checked against it. A large object is a multipart upload whose
parts each carry their CRC32 (``x-amz-checksum-crc32``, which S3 checks the same way, and echoes):
zlib's CRC32 runs at ~5 GB/s where MD5 runs at ~0.7 GB/s, 1.5 s of CPU per GiB that on a small
host competes with everything else (README, "Shipping (fleets)"). One hash per byte serves the
store's check and ours: the body is not hashed a second time for the request signature
(``payload_signing_enabled`` off: the signed checksum header binds it, as botocore does itself
over https), and botocore adds no checksum of its own (``when_required``).

The object appears only at CompleteMultipartUpload, and the upload id and the parts done are
persisted so a restart continues the same upload. Verification reads back the size, the part
count of the ETag and the object's composite CRC32 (the CRC32 of the parts' CRC32s), computed here
from the parts sent.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import zlib
from typing import Callable, Optional

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from corepipe.platform.objectstore import parts
from corepipe.platform.objectstore.base import DestinationError, Location, ObjectInfo

MAX_PARTS = 10000
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "403", "401", "AllAccessDisabled", "InvalidClientTokenId"}
_MD5_ETAG = re.compile(r'"?([0-9a-f]{32})(?:-(\d+))?"?')


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _error(exc: Exception, what: str) -> DestinationError:
    if isinstance(exc, NoCredentialsError):
        return DestinationError(f"{what}: no AWS credentials found (environment, profile, web identity or "
                                "instance metadata)", auth=True)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _AUTH_CODES or status in (401, 403):
            return DestinationError(f"{what}: access denied ({code}); check the AWS credentials and the bucket "
                                    "policy", auth=True)
        return DestinationError(f"{what}: {code}: {exc.response.get('Error', {}).get('Message', '')[:200]}")
    return DestinationError(f"{what}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")


class _Crc32:
    """zlib's CRC32 with hashlib's update/digest."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class S3Destination:
    def __init__(self, location: Location, concurrency: int = 4, bandwidth: int = 0, retries: int = 3):
        self.location = location
        self.concurrency = concurrency
        self.bandwidth = bandwidth
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        config = Config(retries={"max_attempts": retries + 1, "mode": "standard"}, connect_timeout=20,
                        read_timeout=300, max_pool_connections=max(10, concurrency * 2),
                        request_checksum_calculation="when_required",
                        s3={"payload_signing_enabled": False, **({"addressing_style": "path"} if endpoint else {})})
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        self.bucket = location.bucket

    def _call(self, what: str, function: Callable, **kwargs: object) -> dict:
        try:
            return function(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise _error(exc, what) from None

    def head(self, key: str) -> Optional[ObjectInfo]:
        try:
            reply = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _error(exc, f"HEAD {key}") from None
        except (BotoCoreError, OSError) as exc:
            raise _error(exc, f"HEAD {key}") from None
        return ObjectInfo(key=key, size=reply["ContentLength"], metadata=dict(reply.get("Metadata") or {}),
                          etag=reply.get("ETag"), checksum=reply.get("ChecksumCRC32"))

    def put_small(self, key: str, data: bytes, metadata: dict) -> ObjectInfo:
        md5 = hashlib.md5(data)
        self._call(f"upload {key}", self.client.put_object, Key=key, Body=data, Metadata=metadata,
                   ContentMD5=_b64(md5.digest()))
        info = self.head(key)
        etag = _MD5_ETAG.fullmatch(info.etag or "") if info else None
        if (info is None or info.size != len(data)
                or (etag and not etag.group(2) and etag.group(1) != md5.hexdigest())):
            raise DestinationError(f"{key} read back as {info and info.size} bytes, ETag {info and info.etag}; "
                                   f"expected {len(data)} bytes, MD5 {md5.hexdigest()}")
        return info

    def same(self, key: str, fd: int, size: int) -> Optional[ObjectInfo]:
        info = self.head(key)
        etag = _MD5_ETAG.fullmatch(info.etag or "") if info is not None and info.size == size else None
        if etag is None:
            return None
        if not etag.group(2):  # one request: the ETag is the MD5 the store computed of the body
            return info if parts.file_digests(fd, size, max(size, 1), hashlib.md5)[0].hexdigest() == etag.group(1) \
                else None
        # In parts: the store's composite CRC32 (the CRC32 of the parts' CRC32s), parts as this adapter cuts them.
        part_size, _ = parts.plan(size, MAX_PARTS)
        crcs = parts.file_digests(fd, size, part_size, _Crc32)
        composite = _b64(zlib.crc32(b"".join(c.digest() for c in crcs)).to_bytes(4, "big"))
        return info if info.checksum and len(crcs) == int(etag.group(2)) and \
            info.checksum.split("-")[0] == composite else None

    def create(self, key: str, data: bytes, metadata: dict) -> bool:
        for _attempt in range(3):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=metadata,
                                       ContentMD5=_b64(hashlib.md5(data).digest()), IfNoneMatch="*")
                return True
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:  # PreconditionFailed: the object exists
                    return False
                if status != 409:  # 409 ConditionalRequestConflict: another create at the same moment; again
                    raise _error(exc, f"create {key}") from None
            except (BotoCoreError, OSError) as exc:
                raise _error(exc, f"create {key}") from None
        raise DestinationError(f"create {key}: the store answered a conflict three times")

    def put_large(self, key: str, fd: int, size: int, progress: dict, save: Callable[[dict], None],
                  metadata: dict, check: Optional[parts.Check] = None) -> ObjectInfo:
        part_size, concurrency = parts.plan(size, MAX_PARTS, concurrency=self.concurrency)
        if (progress.get("completed") and progress.get("key") == key and progress.get("size") == size
                and progress.get("checksum") == "crc32"):
            try:
                return self._verify(key, size, [p for _n, p in sorted((int(n), p) for n, p in
                                                                      progress["parts"].items())])
            except DestinationError as exc:
                if exc.auth:
                    raise
                progress.clear()  # completed, then found damaged (or gone): uploaded again, never re-verified forever
        finished = self._resume(key, size, part_size, progress, metadata)
        save(progress)
        upload_id = progress["upload_id"]

        def send(number: int, data: bytes) -> dict:
            crc = _b64(zlib.crc32(data).to_bytes(4, "big"))
            reply = self._call(f"upload {key} part {number}", self.client.upload_part, Key=key, UploadId=upload_id,
                               PartNumber=number, Body=data, ChecksumAlgorithm="CRC32", ChecksumCRC32=crc)
            if reply.get("ChecksumCRC32") is None:
                # A store without additional checksums (Ceph RGW before Squid, older MinIO) answers none: the part's
                # ETag, the MD5 of what it stored, says instead (computed only for such a store).
                if reply.get("ETag", "").strip('"') != hashlib.md5(data).hexdigest():
                    raise DestinationError(f"{key} part {number} arrived damaged (ETag {reply.get('ETag')}, no CRC32)")
            elif reply["ChecksumCRC32"] != crc:
                raise DestinationError(f"{key} part {number} arrived damaged (CRC32 {reply.get('ChecksumCRC32')}, "
                                       f"sent {crc})")
            return {"etag": reply["ETag"], "crc32": crc, "size": len(data)}

        parts.upload_recorded(fd, size, part_size, concurrency, finished, send, progress, "parts", save,
                              parts.Bandwidth(self.bandwidth), check)
        numbered = sorted((int(n), p) for n, p in progress["parts"].items())
        self._call(f"complete {key}", self.client.complete_multipart_upload, Key=key, UploadId=upload_id,
                   MultipartUpload={"Parts": [{"PartNumber": n, "ETag": p["etag"], "ChecksumCRC32": p["crc32"]}
                                              for n, p in numbered]})
        progress["completed"] = True
        save(progress)
        return self._verify(key, size, [p for _n, p in numbered])

    def _resume(self, key: str, size: int, part_size: int, progress: dict, metadata: dict) -> dict:
        """Continue the persisted upload if the store still has it (only parts it lists with our size and ETag);
        otherwise, or when the parts cannot be listed, start a new one. The metadata goes on at creation: it is
        the object's once completed."""
        if (progress.get("key") == key and progress.get("part_size") == part_size and progress.get("size") == size
                and progress.get("upload_id") and progress.get("checksum") == "crc32"):
            try:
                listed = self._list_parts(key, progress["upload_id"])
            except DestinationError as exc:
                # Any failure to resume (a role without s3:ListMultipartUploadParts answers access denied) starts a
                # fresh upload, with one warning: with bad credentials that fails too, and says so.
                why = (f"list parts of {key}: access denied: resuming an upload needs s3:ListMultipartUploadParts"
                       if exc.auth else str(exc))
                print(f"corepipe ship: warning: {why}; uploading it afresh", file=sys.stderr)
                listed = None
            if listed is not None:
                kept = {n: p for n, p in progress["parts"].items() if listed.get(int(n)) == (p["size"], p["etag"])}
                progress["parts"] = kept
                return {int(n): True for n in kept}
        reply = self._call(f"start upload of {key}", self.client.create_multipart_upload, Key=key, Metadata=metadata,
                           ChecksumAlgorithm="CRC32")
        progress.clear()
        progress.update({"key": key, "part_size": part_size, "size": size, "upload_id": reply["UploadId"],
                         "checksum": "crc32", "parts": {}})
        return {}

    def _list_parts(self, key: str, upload_id: str) -> dict:
        listed: dict = {}
        marker = 0
        while True:
            reply = self._call(f"list parts of {key}", self.client.list_parts, Key=key, UploadId=upload_id,
                               PartNumberMarker=marker)
            for part in reply.get("Parts") or []:
                listed[part["PartNumber"]] = (part["Size"], part["ETag"])
            if not reply.get("IsTruncated"):
                return listed
            marker = reply["NextPartNumberMarker"]

    def _verify(self, key: str, size: int, done: list) -> ObjectInfo:
        """Size, the ETag's part count and the composite CRC32 as the store reports them, against the parts sent."""
        info = self.head(key)
        etag = _MD5_ETAG.fullmatch(info.etag or "") if info else None
        crcs = _b64(zlib.crc32(b"".join(base64.b64decode(p["crc32"]) for p in done)).to_bytes(4, "big"))
        problems = []
        if info is None:
            problems.append("it does not exist")
        else:
            if info.size != size:
                problems.append(f"{info.size} bytes, expected {size}")
            if etag and etag.group(2) and int(etag.group(2)) != len(done):
                problems.append(f"ETag {info.etag}, expected {len(done)} parts")
            if info.checksum is not None and info.checksum.split("-")[0] != crcs:  # a store without checksums
                problems.append(f"CRC32 {info.checksum}, expected {crcs}-{len(done)}")
        if problems:
            raise DestinationError(f"{key} read back wrong: {'; '.join(problems)}")
        return info  # type: ignore[return-value]

    def list(self, prefix: str) -> list:
        found = []
        token = None
        while True:
            kwargs = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            reply = self._call(f"list {self.location.url}", self.client.list_objects_v2, **kwargs)
            found += [ObjectInfo(key=o["Key"], size=o["Size"], etag=o.get("ETag")) for o in reply.get("Contents") or []]
            if not reply.get("IsTruncated"):
                return found
            token = reply["NextContinuationToken"]

    def get(self, key: str, write: Callable[[bytes], object]) -> int:
        reply = self._call(f"download {key}", self.client.get_object, Key=key)
        total = 0
        try:
            for chunk in reply["Body"].iter_chunks(1 << 20):
                write(chunk)
                total += len(chunk)
        except (BotoCoreError, OSError) as exc:
            raise _error(exc, f"download {key}") from None
        return total

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Key=key)  # S3 answers 204 for a missing key too


def open(location: Location, **options: object) -> S3Destination:  # noqa: A001 - the adapters' entry point
    return S3Destination(location, **options)  # type: ignore[arg-type]
