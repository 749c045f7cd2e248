"""The object store every part of Sfumato uses: generated images, uploaded inputs, data sets,
trained weights and checkpoints (and, optionally, Triton's model repository).

Two backends behind one interface (:class:`ObjectStore`):

* :class:`LocalObjectStore`: files under a directory (the embedded default, ``<data_dir>/images``,
  or ``SFUMATO_STORAGE_URL=file:///path``). Writes are atomic (temporary file + rename), so a
  reader or a second attempt of the same job never sees half an object.
* :class:`S3ObjectStore`: an S3-compatible bucket, ``SFUMATO_STORAGE_URL=s3://bucket/prefix``
  (``SFUMATO_S3_ENDPOINT_URL`` for MinIO, Ceph, GCS's S3 API, ...). Several control-plane
  replicas, workers and training Jobs then share nothing on local disk. boto3 runs in worker
  threads (``asyncio.to_thread``): S3 calls are few per job and I/O bound, boto3's clients are
  thread-safe, and its transfer manager does multipart uploads and ranged parallel downloads of
  large files (weights, data sets); aioboto3 would pin botocore to the range its aiobotocore
  release supports and wraps the transfer manager only in part. S3 PUTs are atomic per object.

Keys are relative, ``/``-separated paths (``generations/<id>/0.png``); a key with an empty,
``.`` or ``..`` segment, a leading ``/``, a backslash or a NUL is refused on both backends, so
the same key means the same object wherever it is stored. A missing object is
:class:`FileNotFoundError` on both.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from sfumato.errors import UsageError

if TYPE_CHECKING:
    from sfumato.control_plane.settings import Settings

CHUNK_BYTES = 256 * 1024  # streamed reads hand out pieces of at most this size


class ObjectReader(Protocol):
    """An object opened for a streamed read: its size, then its bytes piece by piece."""

    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...

    async def open(self, key: str) -> ObjectReader:
        """Open ``key`` for a streamed read (``FileNotFoundError`` when missing)."""
        ...

    async def put_file(self, key: str, path: Path) -> None:
        """Store a local file (large ones in parts), without reading it whole into memory."""
        ...

    async def get_file(self, key: str, path: Path) -> None:
        """Write the object to a local file, atomically."""
        ...

    async def list(self, prefix: str) -> list[str]:
        """Keys that start with ``prefix`` (``"trainings/abc/"``), sorted."""
        ...

    async def presigned_url(self, key: str, *, expires_s: int) -> str | None:
        """A URL anyone holding it may GET for ``expires_s`` seconds; None when the backend has
        none (the local store: the API streams the object instead)."""
        ...


ImageStore = ObjectStore  # the name the job code has always used


def check_key(key: str) -> str:
    """``key`` if it is a relative ``/``-separated path with no empty, ``.`` or ``..`` segment."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"bad storage key: {key!r}")
    if any(part in {"", ".", ".."} for part in key.split("/")):
        raise ValueError(f"bad storage key: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything) or a key, possibly ending in ``/``."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


# ---------------------------------------------------------------------------------------------
# Local directory


@dataclass
class _FileReader:
    handle: BinaryIO
    size: int

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while piece := await asyncio.to_thread(self.handle.read, CHUNK_BYTES):
                yield piece
        finally:
            await asyncio.to_thread(self.handle.close)


class LocalObjectStore:
    """Files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    @staticmethod
    def _write_atomic(path: Path, write: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put(self, key: str, data: bytes) -> None:
        self._write_atomic(self._path(key), lambda handle: handle.write(data))

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._path(key).read_bytes)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def open(self, key: str) -> ObjectReader:
        path = self._path(key)

        def _open() -> _FileReader:
            handle = path.open("rb")
            return _FileReader(handle=handle, size=os.fstat(handle.fileno()).st_size)

        return await asyncio.to_thread(_open)

    def _put_file(self, key: str, source: Path) -> None:
        def copy(handle: BinaryIO) -> None:
            with Path(source).open("rb") as src:
                while piece := src.read(4 * 2**20):
                    handle.write(piece)

        self._write_atomic(self._path(key), copy)

    async def put_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._put_file, key, path)

    def _get_file(self, key: str, target: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(key)

        def copy(handle: BinaryIO) -> None:
            with source.open("rb") as src:
                while piece := src.read(4 * 2**20):
                    handle.write(piece)

        self._write_atomic(Path(target), copy)

    async def get_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._get_file, key, path)

    def _list(self, prefix: str) -> list[str]:
        root = self.root.resolve()
        keys = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue  # a write in progress
                key = (Path(dirpath) / name).relative_to(root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list, check_prefix(prefix))

    async def presigned_url(self, key: str, *, expires_s: int) -> str | None:
        check_key(key)
        return None


# ---------------------------------------------------------------------------------------------
# S3


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise UsageError(f"SFUMATO_STORAGE_URL: expected s3://bucket/prefix, got {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        check_key(prefix)
    return parts.netloc, prefix


@dataclass
class _S3Reader:
    body: Any  # botocore StreamingBody
    size: int

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while piece := await asyncio.to_thread(self.body.read, CHUNK_BYTES):
                yield piece
        finally:
            await asyncio.to_thread(self.body.close)


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix/``. Credentials come from boto3's usual chain
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a web identity token — IRSA, workload
    identity —, an instance profile). ``public_endpoint_url``: where clients reach the store, for
    presigned URLs, when it differs from where the service does (a cluster-internal MinIO)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        public_endpoint_url: str | None = None,
        multipart_threshold: int = 16 * 2**20,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        session = boto3.session.Session(region_name=region)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._presigner = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, use_threads=True)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _missing(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in {"NoSuchKey", "404", "NotFound"}

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def _get_object(self, key: str) -> dict[str, Any]:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise

    async def get(self, key: str) -> bytes:
        def _read() -> bytes:
            body = self._get_object(key)["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return await asyncio.to_thread(_read)

    async def delete(self, key: str) -> None:
        # S3's DeleteObject succeeds for a missing key: deleting twice is fine, as on disk.
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if self._missing(exc):
                return False
            raise
        return True

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._exists, key)

    async def open(self, key: str) -> ObjectReader:
        response = await asyncio.to_thread(self._get_object, key)
        return _S3Reader(body=response["Body"], size=int(response["ContentLength"]))

    async def put_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(
            self._client.upload_file, str(path), self.bucket, self._key(key), Config=self._transfer
        )

    def _get_file(self, key: str, target: Path) -> None:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self._client.download_file(self.bucket, self._key(key), tmp, Config=self._transfer)
            os.replace(tmp, target)
        except Exception as exc:
            Path(tmp).unlink(missing_ok=True)
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise

    async def get_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._get_file, key, path)

    def _pages(self, prefix: str) -> Iterator[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    async def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        return sorted(await asyncio.to_thread(lambda: list(self._pages(prefix))))

    async def presigned_url(self, key: str, *, expires_s: int) -> str | None:
        return await asyncio.to_thread(
            self._presigner.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )


def open_store(settings: Settings) -> ObjectStore:
    """The store ``settings`` name: ``SFUMATO_STORAGE_URL`` (``s3://bucket/prefix`` or
    ``file:///path``), else the local directory ``SFUMATO_IMAGE_DIR`` / ``<data_dir>/images``."""
    url = settings.storage_url
    if not url:
        return LocalObjectStore(settings.resolved_image_dir)
    if url.startswith("file://"):
        return LocalObjectStore(Path(urlsplit(url).path))
    bucket, prefix = parse_s3_url(url)
    return S3ObjectStore(
        bucket,
        prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        public_endpoint_url=settings.s3_public_endpoint_url,
    )


async def put_tree(store: ObjectStore, source: Path, prefix: str) -> list[str]:
    """Upload every file under ``source`` to ``prefix/<relative path>``; returns the keys."""
    source = Path(source)
    keys = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source).as_posix()
        key = f"{prefix.rstrip('/')}/{relative}" if prefix else relative
        await store.put_file(key, path)
        keys.append(key)
    return keys


async def get_tree(store: ObjectStore, prefix: str, target: Path) -> list[Path]:
    """Download every object under ``prefix/`` into ``target`` (keeping the relative paths)."""
    base = prefix.rstrip("/") + "/" if prefix else ""
    written = []
    for key in await store.list(base):
        path = Path(target) / key[len(base) :]
        await store.get_file(key, path)
        written.append(path)
    return written
