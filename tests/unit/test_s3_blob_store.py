"""The blob-store contract, run on LocalBlobStore and on S3BlobStore over HTTP.

No real S3-compatible server installs from PyPI or Debian here (MinIO/Garage/SeaweedFS are
not packaged), so the S3 side talks real HTTP through boto3 to moto's standalone S3 server
(``moto[server]``), an emulator: it checks our use of the S3 API (keys, prefixes, listing,
multipart, errors), not a particular vendor's behaviour.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrawatch_server.storage.blobs import LocalBlobStore
from spectrawatch_server.storage.s3 import S3BlobStore

moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
boto3 = pytest.importorskip("boto3")

Store = Any  # LocalBlobStore | S3BlobStore: the structural BlobStore interface + clear_temp


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    client = s3_client(request.getfixturevalue("s3_endpoint"))
    bucket = f"b-{abs(hash(request.node.name)) % 10**9}"
    client.create_bucket(Bucket=bucket)
    return S3BlobStore(bucket, "spectrawatch/blobs", client=client, spool_dir=tmp_path / "spool")


def put(store: Store, key: str, data: bytes) -> None:
    upload = store.new_upload()
    upload.write(data)
    store.commit_upload(upload, key)


def test_round_trip_listing_and_delete(store: Store) -> None:
    put(store, "runs/1/weights/000000000001-ab.safetensors", b"one")
    put(store, "runs/2/update_sketch/000000000007-cd.safetensors.zst", b"\x00two\xff")
    assert store.read("runs/1/weights/000000000001-ab.safetensors") == b"one"
    assert store.read("runs/2/update_sketch/000000000007-cd.safetensors.zst") == b"\x00two\xff"
    assert store.exists("runs/1/weights/000000000001-ab.safetensors")
    assert not store.exists("runs/1/weights/000000000002-ab.safetensors")
    assert sorted(store.keys()) == [
        "runs/1/weights/000000000001-ab.safetensors",
        "runs/2/update_sketch/000000000007-cd.safetensors.zst",
    ]
    assert store.keys(min_age_seconds=3600) == []  # just written: too young to reconcile
    store.delete("runs/1/weights/000000000001-ab.safetensors")
    store.delete("runs/1/weights/000000000001-ab.safetensors")  # idempotent
    assert store.keys() == ["runs/2/update_sketch/000000000007-cd.safetensors.zst"]
    with pytest.raises(FileNotFoundError):
        store.read("runs/1/weights/000000000001-ab.safetensors")


def test_upload_is_readable_before_commit_and_abort_leaves_nothing(store: Store) -> None:
    upload = store.new_upload()
    upload.write(b"frame body")
    upload.seek(0)
    assert upload.read() == b"frame body"  # the API validates the body from the upload
    store.abort_upload(upload)
    assert store.keys() == []
    assert store.clear_temp() == 0


@pytest.mark.parametrize("key", ["", "a//b", "../x", "a/./b", "a/.."])
def test_invalid_keys_are_refused(store: Store, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        store.read(key)


def test_s3_large_body_goes_multipart_and_abandoned_uploads_are_aborted(
    s3_endpoint: str, tmp_path: Path
) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="multipart")
    store = S3BlobStore.from_url("s3://multipart/pre/fix", client=client, spool_dir=tmp_path)
    body = bytes(range(256)) * (9 * 4096)  # 9 MiB > boto3's 8 MiB multipart threshold
    put(store, "big.safetensors", body)
    assert store.read("big.safetensors") == body
    assert client.list_objects_v2(Bucket="multipart")["Contents"][0]["Key"] == (
        "pre/fix/big.safetensors"
    )
    client.create_multipart_upload(Bucket="multipart", Key="pre/fix/crashed.safetensors")
    client.create_multipart_upload(Bucket="multipart", Key="elsewhere/not-ours")
    # (moto reports a fixed 2010 'Initiated' date, so the age cut-off is not checked here)
    assert store.clear_temp() == 1  # only under our prefix
    remaining = client.list_multipart_uploads(Bucket="multipart").get("Uploads", [])
    assert [u["Key"] for u in remaining] == ["elsewhere/not-ours"]
    assert store.keys() == ["big.safetensors"]


def test_s3_url_parsing() -> None:
    store = S3BlobStore.from_url("s3://bucket", client=object())
    assert (store.bucket, store.prefix, store.object_key("a/b")) == ("bucket", "", "a/b")
    store = S3BlobStore.from_url("s3://bucket/p/q/", client=object())
    assert store.object_key("a/b") == "p/q/a/b"
    with pytest.raises(ValueError, match="s3://"):
        S3BlobStore.from_url("https://bucket/p", client=object())


def test_settings_choose_the_store(tmp_path: Path, s3_endpoint: str) -> None:
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.storage.s3 import open_blob_store

    local = open_blob_store(ServerSettings(data_dir=tmp_path))
    assert isinstance(local, LocalBlobStore)
    assert local.root == tmp_path / "blobs"
    remote = open_blob_store(
        ServerSettings(
            data_dir=tmp_path,
            blob_url="s3://bkt/p",
            s3_endpoint_url=s3_endpoint,
            s3_region="us-east-1",
        )
    )
    assert isinstance(remote, S3BlobStore)
    assert (remote.bucket, remote.prefix) == ("bkt", "p")
    assert remote.client.meta.endpoint_url == s3_endpoint


def test_local_delete_prunes_emptied_directories(tmp_path: Path) -> None:
    local = LocalBlobStore(tmp_path / "blobs")
    put(local, "runs/1/weights/a", b"1")
    put(local, "runs/1/weights/b", b"2")
    put(local, "runs/2/weights/c", b"3")
    local.delete("runs/1/weights/a")
    assert (local.root / "runs/1/weights").is_dir()  # still holds b
    local.delete("runs/1/weights/b")
    assert not (local.root / "runs/1").exists()
    assert (local.root / "runs/2/weights/c").is_file()
    assert local.tmp.is_dir()
    local.delete("runs/2/weights/c")
    assert sorted(p.name for p in local.root.iterdir()) == [".tmp"]  # root and .tmp stay
    put(local, "runs/2/weights/d", b"4")  # the pruned directories are made again
    assert local.read("runs/2/weights/d") == b"4"
