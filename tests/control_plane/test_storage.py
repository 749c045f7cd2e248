"""The object store: one suite, run against the local directory and against S3 (a real S3 API
server process, ``moto_server``, started by the tests); then the API's image downloads from S3,
streamed and as presigned redirects, with the owner check unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path

import boto3
import httpx
import pytest
from pydantic import ValidationError

from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import (
    CHUNK_BYTES,
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    get_tree,
    open_store,
    put_tree,
)

MULTIPART_THRESHOLD = 5 * 2**20  # S3's smallest part: large files below go in one PUT


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, ObjectStore]:
    if request.param == "local":
        return "local", LocalObjectStore(tmp_path / "store")
    request.getfixturevalue("s3_credentials")
    server = request.getfixturevalue("s3_server")
    store = S3ObjectStore(
        server.bucket(),
        "tenant/objects",
        endpoint_url=server.endpoint_url,
        multipart_threshold=MULTIPART_THRESHOLD,
    )
    return "s3", store


@pytest.fixture
def store(backend: tuple[str, ObjectStore]) -> ObjectStore:
    return backend[1]


async def test_put_get_exists_delete(store: ObjectStore) -> None:
    key = "generations/job-1/0.png"
    assert not await store.exists(key)
    await store.put(key, b"first")
    assert await store.exists(key)
    assert await store.get(key) == b"first"
    await store.put(key, b"second, longer")  # overwrite replaces the whole object
    assert await store.get(key) == b"second, longer"
    await store.delete(key)
    assert not await store.exists(key)
    await store.delete(key)  # deleting what is gone is not an error (a job deleted twice)


async def test_missing_object_is_file_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await store.get("nope/0.png")
    with pytest.raises(FileNotFoundError):
        await store.open("nope/0.png")
    target = tmp_path / "out" / "weights.bin"
    with pytest.raises(FileNotFoundError):
        await store.get_file("nope/weights.bin", target)
    assert not target.exists()
    assert not [p for p in (tmp_path / "out").glob("*")], "a failed download leaves no partial file"


async def test_streamed_read_hands_out_bounded_pieces(store: ObjectStore) -> None:
    data = os.urandom(3 * CHUNK_BYTES + 123)
    await store.put("datasets/d1/images.npz", data)
    reader = await store.open("datasets/d1/images.npz")
    assert reader.size == len(data)
    pieces = [piece async for piece in reader.chunks()]
    assert len(pieces) >= 4
    assert all(len(piece) <= CHUNK_BYTES for piece in pieces)
    assert b"".join(pieces) == data


async def test_large_files_round_trip(backend: tuple[str, ObjectStore], tmp_path: Path) -> None:
    kind, store = backend
    source = tmp_path / "unet.safetensors"
    data = os.urandom(2 * MULTIPART_THRESHOLD + 4096)
    source.write_bytes(data)
    await store.put_file("trainings/t1/weights/unet.safetensors", source)
    target = tmp_path / "down" / "unet.safetensors"
    await store.get_file("trainings/t1/weights/unet.safetensors", target)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [p.name for p in target.parent.iterdir()] == ["unet.safetensors"]  # no temporary file left
    if kind == "s3":  # the upload went in parts: S3 gives a multipart object an ETag "<md5>-<parts>"
        assert isinstance(store, S3ObjectStore)
        head = store._client.head_object(
            Bucket=store.bucket, Key="tenant/objects/trainings/t1/weights/unet.safetensors"
        )
        assert re.fullmatch(r"[0-9a-f]{32}-[2-9]", head["ETag"].strip('"')), head["ETag"]


async def test_list_by_prefix(store: ObjectStore) -> None:
    for key in ("trainings/a/ckpt-1.pt", "trainings/a/ckpt-2.pt", "trainings/ab/ckpt-1.pt", "datasets/x.npz"):
        await store.put(key, key.encode())
    assert await store.list("trainings/a/") == ["trainings/a/ckpt-1.pt", "trainings/a/ckpt-2.pt"]
    assert await store.list("trainings/") == [
        "trainings/a/ckpt-1.pt",
        "trainings/a/ckpt-2.pt",
        "trainings/ab/ckpt-1.pt",
    ]
    assert len(await store.list("")) == 4
    assert await store.list("nothing/") == []


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../outside", "a/../../b", "a//b", "a/./b", "a\\b", "a\x00b"]
)
async def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        await store.put(key, b"x")
    for call in (store.get, store.delete, store.exists, store.open):
        with pytest.raises(ValueError, match="storage key"):
            await call(key)
    with pytest.raises(ValueError, match="storage key"):
        await store.presigned_url(key, expires_s=60)


async def test_concurrent_writes_and_reads(store: ObjectStore) -> None:
    payloads = {f"generations/j{i}/0.png": os.urandom(1000 + i) for i in range(32)}
    await asyncio.gather(*(store.put(key, data) for key, data in payloads.items()))
    read = await asyncio.gather(*(store.get(key) for key in payloads))
    assert read == list(payloads.values())


async def test_presigned_urls(backend: tuple[str, ObjectStore]) -> None:
    kind, store = backend
    await store.put("generations/j/0.png", b"\x89PNG fake")
    url = await store.presigned_url("generations/j/0.png", expires_s=120)
    if kind == "local":
        assert url is None  # no URL: the API streams local objects itself
        return
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    async with httpx.AsyncClient() as client:  # no credentials: the signature is the permission
        response = await client.get(url)
        assert response.status_code == 200 and response.content == b"\x89PNG fake"
    # (moto does not verify signatures, so a forged URL cannot be tested here; real S3 does.)


async def test_trees_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "model_repository"
    for rel, data in {
        "pipeline/config.pbtxt": b"name: 'pipeline'",
        "pipeline/1/model.py": b"print()",
        "unet/1/model.onnx": os.urandom(5000),
    }.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    keys = await put_tree(store, source, "models/shapes")
    assert keys == [
        "models/shapes/pipeline/1/model.py",
        "models/shapes/pipeline/config.pbtxt",
        "models/shapes/unet/1/model.onnx",
    ]
    written = await get_tree(store, "models/shapes", tmp_path / "copy")
    assert len(written) == 3
    for rel in ("pipeline/config.pbtxt", "pipeline/1/model.py", "unet/1/model.onnx"):
        assert (tmp_path / "copy" / rel).read_bytes() == (source / rel).read_bytes()


async def test_prefixes_isolate_installations(s3_server, s3_credentials) -> None:
    bucket = s3_server.bucket()
    one = S3ObjectStore(bucket, "one", endpoint_url=s3_server.endpoint_url)
    two = S3ObjectStore(bucket, "two", endpoint_url=s3_server.endpoint_url)
    await one.put("generations/j/0.png", b"one's")
    assert not await two.exists("generations/j/0.png")
    assert await two.list("") == []
    keys = boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in keys] == ["one/generations/j/0.png"]


def test_settings_choose_the_store(tmp_path: Path, s3_server, s3_credentials) -> None:
    local = open_store(Settings(env="test", data_dir=tmp_path))
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path / "images"
    other = open_store(Settings(env="test", data_dir=tmp_path, storage_url=f"file://{tmp_path}/objects"))
    assert isinstance(other, LocalObjectStore) and other.root == tmp_path / "objects"
    s3 = open_store(
        Settings(env="test", storage_url="s3://media/sfumato/prod/", s3_endpoint_url=s3_server.endpoint_url)
    )
    assert isinstance(s3, S3ObjectStore) and (s3.bucket, s3.prefix) == ("media", "sfumato/prod")


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"storage_url": "gs://bucket"}, "storage_url"),
        ({"storage_downloads": "redirect"}, "redirect needs an S3 store"),
        (
            {"storage_downloads": "redirect", "storage_url": "file:///srv/objects"},
            "redirect needs an S3 store",
        ),
        ({"storage_presign_s": 0}, "storage_presign_s"),
    ],
)
def test_bad_storage_settings_are_refused(values: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(env="test", **values)


# --- the API on S3 ---------------------------------------------------------------------------


async def _api_on_s3(api_factory, s3_server, **overrides):
    bucket = s3_server.bucket()
    api = await api_factory(
        storage_url=f"s3://{bucket}/install-1", s3_endpoint_url=s3_server.endpoint_url, **overrides
    )
    return api, bucket


def _bucket_keys(s3_server, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


async def test_api_streams_images_from_s3(api_factory, s3_server, s3_credentials, complete_job) -> None:
    api, bucket = await _api_on_s3(api_factory, s3_server)
    alice, bob = await api.user("alice"), await api.user("bob")
    job = (
        await api.client.post("/v1/generations", json={"prompt": "a red circle"}, headers=api.headers(alice))
    ).json()
    pngs = await complete_job(api, job["id"], count=2)
    assert _bucket_keys(s3_server, bucket) == [
        f"install-1/generations/{job['id']}/0.png",
        f"install-1/generations/{job['id']}/1.png",
    ]
    assert not (api.settings.data_dir / "images").exists() or not any(
        (api.settings.data_dir / "images").rglob("*.png")
    )
    for index, png in enumerate(pngs):
        response = await api.client.get(
            f"/v1/generations/{job['id']}/images/{index}", headers=api.headers(alice)
        )
        assert response.status_code == 200, response.text
        assert response.content == png and response.headers["content-type"] == "image/png"
        assert response.headers["content-length"] == str(len(png))
        etag = response.headers["etag"]
        again = await api.client.get(
            f"/v1/generations/{job['id']}/images/{index}",
            headers=api.headers(alice, **{"If-None-Match": etag}),
        )
        assert again.status_code == 304
    # Another user's image: 404, never data (the owner check comes before the store).
    response = await api.client.get(f"/v1/generations/{job['id']}/images/0", headers=api.headers(bob))
    assert response.status_code == 404 and b"PNG" not in response.content
    # Deleting the job removes its objects from the bucket.
    assert (
        await api.client.delete(f"/v1/generations/{job['id']}", headers=api.headers(alice))
    ).status_code == 204
    assert _bucket_keys(s3_server, bucket) == []


async def test_api_redirects_to_presigned_urls(api_factory, s3_server, s3_credentials, complete_job) -> None:
    api, _bucket = await _api_on_s3(
        api_factory, s3_server, storage_downloads="redirect", storage_presign_s=90
    )
    alice, bob = await api.user("alice"), await api.user("bob")
    job = (
        await api.client.post("/v1/generations", json={"prompt": "a red circle"}, headers=api.headers(alice))
    ).json()
    (png,) = await complete_job(api, job["id"])
    response = await api.client.get(f"/v1/generations/{job['id']}/images/0", headers=api.headers(alice))
    assert response.status_code == 307, response.text
    assert response.headers["cache-control"] == "private, no-store"  # the URL expires: never cache it
    location = response.headers["location"]
    assert location.startswith(s3_server.endpoint_url) and "X-Amz-Expires=90" in location
    async with httpx.AsyncClient() as client:
        download = await client.get(location)
    assert download.status_code == 200 and download.content == png
    refused = await api.client.get(f"/v1/generations/{job['id']}/images/0", headers=api.headers(bob))
    assert refused.status_code == 404 and "location" not in refused.headers
    missing = await api.client.get(f"/v1/generations/{job['id']}/images/5", headers=api.headers(alice))
    assert missing.status_code == 404
