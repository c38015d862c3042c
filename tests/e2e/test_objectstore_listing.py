"""The adapters' listing (``Destination.list``) against real servers on loopback, SeaweedFS and Azurite: every key
with its size and ETag, whatever characters a node put in its names, over several pages, and one line for a
refused listing. Azure's is read from the List Blobs XML itself, not through the SDK's model objects
(docs/shipping.md, "Fleet benchmark"), so these compare it with what the SDK lists."""

from __future__ import annotations

from pathlib import Path

import objectstores
import pytest

from corepipe.platform.objectstore import DestinationError, open_destination

#: Names any node with the bucket's credentials can write: XML's special characters, percent signs, spaces,
#: non-ASCII, a control character (the Azure service sends such a name URL-encoded), a very long one.
NAMES = ["plain.ndjson.gz", "a b&c<d>e'f\"g.gz", "100%25 done%.gz", "ünï-コード.gz", "tab\there.gz", "ctl\x01x.gz",
         "deep/er/still/x.gz", "x" * 200]


@pytest.fixture(params=["seaweedfs", "azure"])
def server(request: pytest.FixtureRequest, tmp_path: Path):
    yield from objectstores.running(request.param, tmp_path)


def _destination(server: objectstores.Server, url: str, env: dict, monkeypatch: pytest.MonkeyPatch):
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_URL", "AZURE_STORAGE_SAS_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return open_destination(url, retries=0)


def test_listing_gives_every_key_size_and_etag_over_pages(server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = objectstores.Bucket(server)
    written = {}
    for number, name in enumerate(NAMES):
        if "\x01" in name and isinstance(server, objectstores.Azurite):
            continue  # Azurite answers 500 to a listing that holds one (the service URL-encodes it: unit/test_fleet.py)
        bucket.put(f"fleet/_index/v1/{name}", b"y" * number)
        written[f"fleet/_index/v1/{name}"] = number
    bucket.put("fleet/_index/v1", b"not under the prefix")  # a key the prefix (with its slash) does not match
    bucket.put("fleet/node-a/record.json", b"z")
    destination = _destination(server, server.url("fleet"), server.env, monkeypatch)
    if hasattr(destination, "page"):
        destination.page = 3  # Azure: several pages (S3 pages at 1,000 keys, which are not written here)
    listed = destination.list("fleet/_index/v1/")
    assert {o.key: o.size for o in listed} == written
    assert len(listed) == len(written) and all(o.etag and not o.metadata for o in listed)
    assert sorted(bucket.keys("fleet/_index/v1/")) == sorted(written)  # as the server's own SDK lists them
    assert destination.list("fleet/nothing-here/") == []


def test_a_refused_listing_is_one_line(server, monkeypatch: pytest.MonkeyPatch) -> None:
    destination = _destination(server, server.url("fleet"), server.bad_env(), monkeypatch)
    with pytest.raises(DestinationError) as refused:
        destination.list("fleet/")
    assert refused.value.auth and "access denied" in str(refused.value) and "\n" not in str(refused.value)
    missing = _destination(server, server.url("fleet").replace("crashes", "no-such-bucket"), server.env, monkeypatch)
    with pytest.raises(DestinationError) as gone:
        missing.list("fleet/")
    assert not gone.value.auth and "\n" not in str(gone.value), gone.value


def test_azure_lists_with_a_sas_in_the_account_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SAS rides in the listing's query string with the listing's own parameters."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    server = objectstores.make("azure", tmp_path)
    server.start()
    try:
        objectstores.Bucket(server).put("fleet/_index/v1/a.gz", b"abc")
        sas = generate_container_sas(objectstores.AZURITE_ACCOUNT, server.container,
                                     account_key=objectstores.AZURITE_KEY, expiry=datetime.now(timezone.utc) +
                                     timedelta(hours=1), permission=ContainerSasPermissions(read=True, list=True))
        account = f"http://127.0.0.1:{server.port}/{objectstores.AZURITE_ACCOUNT}"
        destination = _destination(server, server.url("fleet"), {"AZURE_STORAGE_ACCOUNT_URL": account,
                                                                 "AZURE_STORAGE_SAS_TOKEN": sas}, monkeypatch)
        assert [(o.key, o.size) for o in destination.list("fleet/")] == [("fleet/_index/v1/a.gz", 3)]
    finally:
        server.stop()
