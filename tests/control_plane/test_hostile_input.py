"""Hostile input never gets a 500, on SQLite and on PostgreSQL.

* Property tests (hypothesis) against the real API over HTTP (``sfumato serve``): mutated PNG
  and JPEG files as ``image`` and ``mask``, and random cursors, always answer a 4xx
  ``application/problem+json`` naming the field (or succeed), never a 500; the server logs no
  traceback.
* Decompression bombs (a real 20000×20000 and 65535×65535 1-bit PNG, a JPEG whose header claims
  65500×65500, a 5000×5000 PNG) are refused from their header, before decoding.
* The cursors of the issue (``0001-01-01|a``: naive; ``0001-01-01T00:00:00+01:00|a``: out of
  range in UTC) are 400 naming ``cursor``; cursors round-trip.
* Image decoding runs on a worker thread, not on the event loop.
* An unknown exception is logged with its traceback and answered as a problem 500 on a
  connection that stays open (over real uvicorn).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import struct
import threading
import zlib
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sfumato.control_plane import pagination, uploads
from sfumato.errors import BadRequestError
from sfumato.triton_server import free_port

from .problems import assert_problem
from .served import served

PROMPT = "a red circle on a white background"
PROPERTY_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def seed_files() -> dict[str, bytes]:
    """Valid 32×32 files of each kind a client may send: the starting points of the mutations."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return {
        "png-rgb": encode(rgb, "PNG"),
        "png-grey": encode(rgb.convert("L"), "PNG"),
        "png-palette": encode(rgb.convert("P"), "PNG"),
        "png-1bit": encode(rgb.convert("1"), "PNG"),
        "png-rgba": encode(rgb.convert("RGBA"), "PNG"),
        "png-interlaced": encode(rgb, "PNG", interlace=1),
        "jpeg": encode(rgb, "JPEG", quality=90),
        "jpeg-progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg-grey": encode(rgb.convert("L"), "JPEG"),
    }


def segment_fields(data: bytes) -> list[tuple[int, int, int]]:
    """``(length offset, length size, type offset)`` of each PNG chunk / JPEG marker segment
    (up to the scan): where a mutation reaches the parsers rather than the pixel data."""
    fields = []
    if data.startswith(b"\x89PNG"):
        at = 8
        while at + 8 <= len(data):
            fields.append((at, 4, at + 4))
            at += 12 + struct.unpack(">I", data[at : at + 4])[0]
    elif data.startswith(b"\xff\xd8"):
        at = 2
        while at + 4 <= len(data) and data[at] == 0xFF:
            fields.append((at + 2, 2, at + 1))
            if data[at + 1] == 0xDA:  # start of scan: entropy-coded data follows
                break
            at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return fields


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A seed file with 1 to 4 mutations: a chunk's / segment's length or type replaced (the
    parsers' paths: truncated headers, misaligned chunks), or bytes flipped, set, inserted,
    deleted, or the file truncated (half of those aimed at the first 80 bytes)."""
    data = bytearray(seed_files()[draw(st.sampled_from(sorted(seed_files())))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(
            st.sampled_from(["length", "type", "length", "type", "flip", "set", "insert", "delete", "cut"])
        )
        fields = segment_fields(bytes(data))
        if kind in ("length", "type") and fields:
            length_at, size, type_at = draw(st.sampled_from(fields))
            if kind == "length":
                extremes = st.sampled_from([0, 1, 2, 12, 13, 100, 2 ** (8 * size) - 1])
                value = draw(st.one_of(extremes, st.integers(0, 2 ** (8 * size) - 1)))
                data[length_at : length_at + size] = value.to_bytes(size, "big")
            else:
                width = 4 if size == 4 else 1
                data[type_at : type_at + width] = draw(st.binary(min_size=width, max_size=width))
            continue
        last = len(data) - 1
        at = draw(st.one_of(st.integers(0, min(80, last)), st.integers(0, last)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def offsets() -> st.SearchStrategy[timezone | None]:
    return st.one_of(st.none(), st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m))))


def cursors() -> st.SearchStrategy[str]:
    """Random text, base64 of random bytes, and base64 of ``<timestamp>|<id>`` with naive,
    aware and extreme timestamps (years 1 and 9999, offsets up to ±23:59)."""
    stamps = st.builds(lambda dt, tz: dt.replace(tzinfo=tz).isoformat(), st.datetimes(), offsets()) | st.text(
        max_size=40
    )
    ids = st.text(alphabet="abcdef0123456789-_|", min_size=0, max_size=40) | st.text(max_size=10)
    made = st.builds(lambda s, i: f"{s}|{i}", stamps, ids)
    return st.one_of(
        st.text(max_size=200),
        st.binary(max_size=140).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
        made.map(lambda raw: base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")),
    )


def check_answer(response: httpx.Response, field: str, ok: int) -> None:
    """A success, or a 4xx problem that names ``field`` when it is a 400 or 422."""
    assert response.status_code < 500, response.text
    if response.status_code == ok:
        return
    body = assert_problem(response, response.status_code)
    assert 400 <= response.status_code < 500, body
    if response.status_code in (400, 422):
        assert field in [e["field"] for e in body["errors"]], body


def fuzz_the_api(url: str, headers: dict[str, str]) -> None:
    """The properties, run synchronously against a served API."""
    valid = b64(seed_files()["png-rgb"])
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:

        @PROPERTY_SETTINGS
        @given(data=mutated_files(), as_mask=st.booleans())
        def images_never_get_a_500(data: bytes, as_mask: bool) -> None:
            body = (
                {"prompt": PROMPT, "image": valid, "mask": b64(data)}
                if as_mask
                else {
                    "prompt": PROMPT,
                    "image": b64(data),
                }
            )
            response = client.post("/v1/generations", json=body)
            check_answer(response, "mask" if as_mask else "image", ok=202)

        @PROPERTY_SETTINGS
        @given(cursor=cursors())
        def cursors_never_get_a_500(cursor: str) -> None:
            response = client.get("/v1/generations", params={"cursor": cursor})
            check_answer(response, "cursor", ok=200)

        images_never_get_a_500()
        cursors_never_get_a_500()


async def test_mutated_images_and_random_cursors_never_get_a_500(database_url: str, tmp_path: Path) -> None:
    with served(database_url, tmp_path / "serve") as api:
        await asyncio.to_thread(fuzz_the_api, api.url, api.headers)
    log = api.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


# --------------------------------------------------------------------------- bombs


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def bilevel_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of ``width``×``height`` zeros, compressed as a stream: a
    decompression bomb (65535² is 0.5 MB of file and 4.3 G pixels)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # depth 1, greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width``×``height``."""
    data = bytearray(seed_files()["jpeg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


async def test_decompression_bombs_are_refused_from_the_header(api, monkeypatch) -> None:
    alice = await api.user("alice")
    decoded: list[tuple[int, int]] = []
    convert = Image.Image.convert

    def watched_convert(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        decoded.append(self.size)  # convert() is where the pixels get decoded
        return convert(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", watched_convert)
    big = encode(Image.new("RGB", (5000, 5000), (200, 30, 30)), "PNG")
    bombs = {
        "20000x20000 1-bit PNG": bilevel_png(20000, 20000),
        "65535x65535 1-bit PNG": bilevel_png(65535, 65535),
        "JPEG claiming 65500x65500": jpeg_claiming(65500, 65500),
        "5000x5000 PNG": big,
    }
    valid = b64(seed_files()["png-rgb"])
    for name, data in bombs.items():
        assert len(b64(data)) < api.settings.max_body_bytes, name
        for field in ("image", "mask"):
            body = (
                {"prompt": PROMPT, "image": valid, "mask": b64(data)}
                if field == "mask"
                else {
                    "prompt": PROMPT,
                    "image": b64(data),
                }
            )
            r = await api.client.post("/v1/generations", json=body, headers=api.headers(alice))
            problem = assert_problem(r, 422, field)
            assert "pixels" in problem["detail"], (name, problem)
    assert all(w * h <= 32 * 32 for w, h in decoded), decoded  # only the valid image was decoded


async def test_a_corrupt_upload_is_a_422_naming_the_field(api) -> None:
    alice = await api.user("alice")
    png = seed_files()["png-rgb"]
    broken_chunk = bytearray(png)
    broken_chunk[40] ^= 0xFF  # inside the first IDAT: a CRC mismatch
    cases = {
        "truncated": png[: len(png) // 2],
        "broken chunk": bytes(broken_chunk),
        "not an image": b"GIF89a" + b"\x00" * 40,
        "a GIF": encode(Image.new("RGB", (32, 32)), "GIF"),
        "truncated JPEG": seed_files()["jpeg"][:200],
    }
    for name, data in cases.items():
        r = await api.client.post(
            "/v1/generations", json={"prompt": PROMPT, "image": b64(data)}, headers=api.headers(alice)
        )
        problem = assert_problem(r, 422, "image")
        assert problem["detail"].startswith("image:"), (name, problem)
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "image": "not base64!"}, headers=api.headers(alice)
    )
    assert_problem(r, 422, "image")


def test_the_upload_check_happens_before_pixels_are_read() -> None:
    """The header check alone: a 65535² PNG is refused without decoding (no memory blow-up)."""
    with pytest.raises(Exception) as raised:
        uploads._read(b64(bilevel_png(65535, 65535)), "image", "L", 4096 * 4096)
    assert getattr(raised.value, "field", None) == "image" and "pixels" in str(raised.value)


async def test_images_are_decoded_on_a_worker_thread(api, monkeypatch) -> None:
    alice = await api.user("alice")
    threads: list[int] = []
    read = uploads._read

    def watched(*args: Any) -> uploads.Upload:
        threads.append(threading.get_ident())
        return read(*args)

    monkeypatch.setattr(uploads, "_read", watched)
    loop_thread = threading.get_ident()
    body = {"prompt": PROMPT, "image": b64(seed_files()["png-rgb"]), "mask": b64(seed_files()["png-grey"])}
    r = await api.client.post("/v1/generations", json=body, headers=api.headers(alice))
    assert r.status_code == 202, r.text
    assert len(threads) == 2 and loop_thread not in threads


# --------------------------------------------------------------------------- cursors


async def test_the_issues_cursors_are_400_naming_cursor(api) -> None:
    alice = await api.user("alice")
    for raw in ("0001-01-01|a", "0001-01-01T00:00:00+01:00|a", "9999-12-31T23:59:59-01:00|a", "|", "x|a"):
        cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        r = await api.client.get("/v1/generations", params={"cursor": cursor}, headers=api.headers(alice))
        problem = assert_problem(r, 400, "cursor")
        assert problem["title"] == "Bad request", problem
    # The extremes that are valid positions page normally.
    for moment in (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, tzinfo=UTC)):
        cursor = pagination.encode_cursor(moment, "a")
        r = await api.client.get("/v1/generations", params={"cursor": cursor}, headers=api.headers(alice))
        assert r.status_code == 200, r.text


@settings(max_examples=300, deadline=None, database=None)
@given(
    moment=st.datetimes(timezones=st.just(UTC)),
    item_id=st.text(alphabet="abcdefABCDEF0123456789_-", min_size=1, max_size=64),
)
def test_cursors_round_trip(moment: datetime, item_id: str) -> None:
    position = pagination.decode_cursor(pagination.encode_cursor(moment, item_id))
    assert position == pagination.Position(created_at=moment, id=item_id)


@settings(max_examples=300, deadline=None, database=None)
@given(cursor=cursors())
def test_decode_cursor_raises_nothing_but_bad_request(cursor: str) -> None:
    try:
        position = pagination.decode_cursor(cursor)
    except BadRequestError as exc:
        assert exc.field == "cursor" and exc.http_status == 400
        return
    assert position.created_at.tzinfo is UTC and position.id


# --------------------------------------------------------------------------- unknown errors


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # no database involved
async def test_an_unknown_exception_is_a_logged_problem_500_on_a_kept_connection(
    api_factory, caplog: pytest.LogCaptureFixture
) -> None:
    api = await api_factory()
    app = api.app

    @app.get("/boom")  # type: ignore[attr-defined]
    async def boom() -> None:
        raise RuntimeError("a bug, on purpose")

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), serving.exception()
            await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
        with caplog.at_level(logging.ERROR, logger="sfumato.api"):
            answers = []
            for path in ("/boom", "/healthz"):  # one connection, two requests in turn
                request = f"GET {path} HTTP/1.1\r\nHost: sfumato.test\r\nX-Request-ID: r-{path[1:]}\r\n\r\n"
                writer.write(request.encode())
                await writer.drain()
                head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode()
                length = int(
                    next(h for h in head.split("\r\n") if h.lower().startswith("content-length")).split(":")[
                        1
                    ]
                )
                answers.append((head, await asyncio.wait_for(reader.readexactly(length), 30)))
        writer.close()
        (boom_head, boom_body), (health_head, health_body) = answers
        assert boom_head.startswith("HTTP/1.1 500") and "application/problem+json" in boom_head, boom_head
        assert "x-request-id: r-boom" in boom_head.lower()
        problem = httpx.Response(500, content=boom_body).json()
        assert (
            problem["status"] == 500
            and problem["title"] == "Internal error"
            and "r-boom" in problem["detail"]
        )
        assert "a bug, on purpose" not in boom_body.decode()  # no internals in the answer
        assert health_head.startswith("HTTP/1.1 200") and b'"ok"' in health_body
        logged = [r for r in caplog.records if r.name == "sfumato.api" and r.exc_info]
        assert logged and isinstance(logged[0].exc_info[1], RuntimeError), caplog.records
    finally:
        server.should_exit = True
        await serving
