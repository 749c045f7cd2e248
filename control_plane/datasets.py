"""Training data sets: a zip upload, checked entry by entry, stored in the object store.

The zip holds images and a ``metadata.jsonl`` whose lines are ``{"file_name": ..., "text": ...}``
(the Hugging Face image-folder convention). Everything is checked before anything is stored,
and every refusal is a 422 naming the entry (``field`` is ``file``, the message names the entry):

1. the upload is a zip (``zipfile`` reads its central directory; nothing is unpacked yet);
2. every entry's name is a plain relative path: no absolute path, drive letter, backslash, NUL,
   ``.`` or ``..`` segment (path traversal), no symbolic link, no duplicate name;
3. zip bombs: no entry unpacks to more than ``SFUMATO_MAX_DATASET_RATIO`` times its packed size,
   and all entries together to no more than ``SFUMATO_MAX_DATASET_UNPACKED_BYTES``. The sizes are
   the declared ones, and reads are bounded by them (``zipfile`` stops at the declared size and
   then checks the CRC), so a lying header cannot make more bytes come out;
4. only ``metadata.jsonl`` and ``.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` files (and folders;
   ``__MACOSX/`` resource forks are skipped);
5. every line of ``metadata.jsonl`` is a JSON object with a ``file_name`` that is in the zip and
   a non-empty ``text`` (at most 1000 characters); no image twice; 1 to
   ``SFUMATO_MAX_DATASET_IMAGES`` images;
6. every image: PNG, JPEG or WebP by its header (Pillow is allowed no other decoder), at most
   ``SFUMATO_MAX_DATASET_IMAGE_PIXELS`` pixels by its header, then decoded whole (corrupt or
   truncated data is refused).

All of it runs in a worker thread (:func:`asyncio.to_thread`): decoding thousands of images would
otherwise stall the event loop. The checked images are stored as sent under
``datasets/<id>/images/<n>.<ext>`` with a ``metadata.jsonl`` naming them, so a training reads
back exactly the folder layout it expects.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from sfumato.control_plane import pagination
from sfumato.control_plane.auth import Principal
from sfumato.control_plane.models import Dataset, Job, new_id
from sfumato.control_plane.pagination import Page
from sfumato.control_plane.settings import Settings
from sfumato.control_plane.storage import ObjectStore
from sfumato.control_plane.uploads import DECODER_ERRORS
from sfumato.errors import ConflictError, NotFoundError, UsageError

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_CAPTION = 1000
FIELD = "file"


@dataclass(frozen=True, slots=True)
class CheckedImage:
    entry: str  # the name in the zip
    suffix: str
    text: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class CheckedDataset:
    images: list[CheckedImage]
    unpacked_bytes: int


def _refuse(message: str) -> UsageError:
    return UsageError(f"{FIELD}: {message}", field=FIELD)


def _check_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    mode = info.external_attr >> 16
    if "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _refuse(f"entry {name!r}: not a relative path inside the zip")
    parts = name.rstrip("/").split("/")
    if any(part in {"", ".", ".."} for part in parts):
        raise _refuse(f"entry {name!r}: path traversal ('..', '.' or an empty segment) is not allowed")
    if stat.S_ISLNK(mode):
        raise _refuse(f"entry {name!r}: symbolic links are not allowed")
    return name


def check_zip(source: BinaryIO, *, settings: Settings) -> CheckedDataset:
    """Check an uploaded data set (see the module's docstring); blocking, run it in a thread."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _refuse("not a zip archive") from None
    with archive:
        entries: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in archive.infolist():
            name = _check_name(info)
            if name.startswith("__MACOSX/"):
                continue
            if name in entries:
                raise _refuse(f"entry {name!r}: appears twice in the zip")
            if info.is_dir():
                continue
            packed = max(info.compress_size, 1)
            if info.file_size / packed > settings.max_dataset_ratio:
                raise _refuse(
                    f"entry {name!r}: unpacks to {info.file_size} bytes from {info.compress_size} "
                    f"(more than {settings.max_dataset_ratio:g} times; a zip bomb?)"
                )
            total += info.file_size
            if total > settings.max_dataset_unpacked_bytes:
                raise _refuse(
                    f"entry {name!r}: the data set unpacks to more than "
                    f"{settings.max_dataset_unpacked_bytes} bytes (a zip bomb?)"
                )
            suffix = PurePosixPath(name).suffix.lower()
            if PurePosixPath(name).name != METADATA and suffix not in IMAGE_SUFFIXES:
                raise _refuse(
                    f"entry {name!r}: only {METADATA} and .png, .jpg, .jpeg, .webp images belong here"
                )
            entries[name] = info
        if METADATA not in entries:
            raise _refuse(f"no {METADATA} at the top of the zip")
        lines = _read(archive, entries[METADATA]).decode("utf-8", errors="replace").splitlines()
        images: list[CheckedImage] = []
        seen: set[str] = set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"entry {METADATA!r} line {number}"
            try:
                record = json.loads(line)
            except ValueError:
                raise _refuse(f"{where}: not JSON") from None
            if not isinstance(record, dict):
                raise _refuse(f"{where}: not a JSON object")
            file_name, text = record.get("file_name"), record.get("text")
            if not isinstance(file_name, str) or not file_name:
                raise _refuse(f"{where}: file_name must be a non-empty string")
            if not isinstance(text, str) or not text.strip():
                raise _refuse(f"{where} ({file_name!r}): the caption (text) is empty")
            if len(text) > MAX_CAPTION:
                raise _refuse(f"{where} ({file_name!r}): the caption is longer than {MAX_CAPTION} characters")
            key = str(PurePosixPath(file_name))
            if key not in entries or key == METADATA:
                raise _refuse(f"{where}: the image {file_name!r} is not in the zip")
            if key in seen:
                raise _refuse(f"{where}: the image {file_name!r} is listed twice")
            seen.add(key)
            if len(seen) > settings.max_dataset_images:
                raise _refuse(f"more than {settings.max_dataset_images} images")
            images.append(_check_image(archive, entries[key], text.strip(), settings=settings))
        if not images:
            raise _refuse(f"{METADATA} lists no images")
        return CheckedDataset(images=images, unpacked_bytes=total)


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as handle:
            data = handle.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise _refuse(f"entry {info.filename!r}: cannot be unpacked ({exc})") from None
    if len(data) != info.file_size:
        raise _refuse(f"entry {info.filename!r}: its size does not match the zip's header")
    return data


def _check_image(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, text: str, *, settings: Settings
) -> CheckedImage:
    name = info.filename
    data = _read(archive, info)
    try:
        with PILImage.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            if width * height > settings.max_dataset_image_pixels:
                raise _refuse(
                    f"entry {name!r}: {width}x{height} is {width * height} pixels; "
                    f"the limit is {settings.max_dataset_image_pixels}"
                )
            img.load()
    except PILImage.DecompressionBombError:
        raise _refuse(f"entry {name!r}: too many pixels") from None
    except UnidentifiedImageError:
        raise _refuse(f"entry {name!r}: not a PNG, JPEG or WebP image") from None
    except DECODER_ERRORS:
        raise _refuse(f"entry {name!r}: a corrupt or truncated image") from None
    return CheckedImage(
        entry=name, suffix=PurePosixPath(name).suffix.lower(), text=text, width=width, height=height
    )


def _unpack(source: BinaryIO, checked: CheckedDataset, target: Path) -> None:
    """The checked images as ``images/<n>.<ext>`` and their ``metadata.jsonl``, under ``target``."""
    (target / "images").mkdir(parents=True)
    with zipfile.ZipFile(source) as archive, (target / METADATA).open("w") as metadata:
        for index, image in enumerate(checked.images):
            stored = f"images/{index}{image.suffix}"
            (target / stored).write_bytes(_read(archive, archive.getinfo(image.entry)))
            metadata.write(json.dumps({"file_name": stored, "text": image.text}) + "\n")


def _digest(source: BinaryIO) -> tuple[str, int]:
    source.seek(0)
    digest = hashlib.sha256()
    size = 0
    while piece := source.read(2**20):
        digest.update(piece)
        size += len(piece)
    source.seek(0)
    return digest.hexdigest(), size


async def create_dataset(
    *,
    session: AsyncSession,
    settings: Settings,
    store: ObjectStore,
    principal: Principal,
    source: BinaryIO,
    name: str,
) -> Dataset:
    """Check the zip in ``source`` (seekable) in a worker thread, store it, record it."""
    checked = await asyncio.to_thread(check_zip, source, settings=settings)
    sha256, size = await asyncio.to_thread(_digest, source)
    dataset_id = new_id()
    prefix = f"datasets/{dataset_id}"
    staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="sfumato-dataset-"))
    try:
        await asyncio.to_thread(_unpack, source, checked, staging / "data")
        from sfumato.control_plane.storage import put_tree

        await put_tree(store, staging / "data", prefix)
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    dataset = Dataset(
        id=dataset_id,
        owner_id=principal.user_id,
        name=name[:255],
        num_images=len(checked.images),
        size_bytes=size,
        storage_prefix=prefix,
        sha256=sha256,
    )
    session.add(dataset)
    await session.commit()
    return dataset


async def get_dataset(*, session: AsyncSession, principal: Principal, dataset_id: str) -> Dataset:
    """The caller's data set (another user's is as missing as one that never was); the read
    transaction is over when this returns."""
    try:
        dataset = await session.get(Dataset, dataset_id)
        if dataset is None or dataset.owner_id != principal.user_id:
            raise NotFoundError(f"no dataset {dataset_id}")
        return dataset
    finally:
        await session.commit()


async def list_datasets(
    *, session: AsyncSession, principal: Principal, limit: int, cursor: str | None
) -> Page[Dataset]:
    """The caller's data sets, newest first, keyset-paginated on (created_at, id)."""
    query = select(Dataset).where(Dataset.owner_id == principal.user_id)
    if cursor is not None:
        after = pagination.decode_cursor(cursor)
        query = query.where(
            or_(
                Dataset.created_at < after.created_at,
                and_(Dataset.created_at == after.created_at, Dataset.id < after.id),
            )
        )
    rows = list(
        (
            await session.scalars(
                query.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit + 1)
            )
        ).all()
    )
    await session.commit()
    more = len(rows) > limit
    items = rows[:limit]
    last = items[-1] if more and items else None
    return Page(items=items, next_cursor=pagination.encode_cursor(last.created_at, last.id) if last else None)


async def delete_dataset(
    *, session: AsyncSession, store: ObjectStore, principal: Principal, dataset_id: str
) -> None:
    """Remove the record and its files; 409 while a queued or running training uses it."""
    dataset = await session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner_id != principal.user_id:
        await session.rollback()
        raise NotFoundError(f"no dataset {dataset_id}")
    users = await session.scalars(
        select(Job.params).where(Job.queue == "trainings", Job.status.in_(("queued", "running")))
    )
    if any(params.get("dataset_id") == dataset_id for params in users):
        await session.rollback()
        raise ConflictError(f"dataset {dataset_id} is used by a queued or running training")
    prefix = dataset.storage_prefix
    await session.execute(delete(Dataset).where(Dataset.id == dataset_id))
    await session.commit()
    for key in await store.list(prefix + "/"):
        await store.delete(key)
